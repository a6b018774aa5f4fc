//! Names as the API server checks them, in one place: namespaces and Service names, port
//! names, finalizers, and the timestamps it writes. Whatever reaches the kernel's comments
//! or the API server's patches passes one of these first.

/// An RFC 1123 label: what Kubernetes requires of namespaces and Service names.
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// An IANA service name as Kubernetes accepts for a port name: 1 to 15 characters of
/// lower-case letters, digits and single inner hyphens, with at least one letter.
pub fn is_port_name(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !text.contains("--")
}

/// Whether `finalizer` is a name the API server accepts (transcript 06).
pub fn valid_finalizer(finalizer: &str) -> bool {
    let Some((prefix, name)) = finalizer.split_once('/') else {
        return false;
    };
    let prefix_ok =
        !prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(is_dns_label);
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    prefix_ok && name_ok
}

/// `metadata.creationTimestamp` as the API server writes it: RFC 3339, UTC, whole seconds.
/// In that fixed form, text order is time order, so no date library is needed to rank.
pub fn is_kubernetes_time(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    b.len() == 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'Z'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_kubernetes() {
        assert!(is_port_name("http"));
        assert!(is_port_name("web-2"));
        assert!(!is_port_name("Web"));
        assert!(!is_port_name("-web"));
        assert!(!is_port_name("web--x"));
        assert!(!is_port_name("sixteen-chars-xx"));
        assert!(!is_port_name("123"));
    }

    #[test]
    fn finalizer_names_are_qualified() {
        assert!(valid_finalizer("kube-port-forward-controller/finalizer"));
        assert!(valid_finalizer("kube-port-forward-controller/router-b"));
        assert!(!valid_finalizer(
            "kube-port-forward-controller/finalizer:port1=80"
        ));
        assert!(!valid_finalizer("no-prefix"));
        assert!(!valid_finalizer("Upper.Case/x"));
    }
}

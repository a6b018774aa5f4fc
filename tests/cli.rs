//! The command line as a user meets it: exit codes and error messages. No kernel needed.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// `plan -o json -f -` with `args`, reading `yaml` from standard input.
fn plan_stdin(args: &[&str], yaml: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["plan", "-o", "json", "-f", "-"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn plan_of_the_examples_succeeds_and_check_flags_problems() {
    let output = run(&["plan", "-f", "examples/"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    for state in ["forwarding", "conflict", "invalid", "waiting", "refused"] {
        assert!(
            text.contains(&format!("\n{state} ")),
            "no {state} in:\n{text}"
        );
    }
    assert_eq!(
        run(&["plan", "--check", "-f", "examples/"]).status.code(),
        Some(3)
    );
}

#[test]
fn check_passes_on_clean_manifests_from_stdin() {
    let yaml = "kind: Service\nmetadata: {name: ok, annotations: {kube-port-forward-controller/mapping: http}}\nspec: {ports: [{name: http, port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 10.0.0.1}]}}\n";
    let output = plan_stdin(&["--check"], yaml);
    assert_eq!(output.status.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["forwards"][0]["state"], "forwarding");
    assert!(plan["nft_json"]["nftables"].is_array());
}

#[test]
fn unreadable_and_malformed_files_exit_2_naming_the_file() {
    let output = run(&["plan", "-f", "does/not/exist.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("does/not/exist.yaml"),
        "{}",
        stderr(&output)
    );

    let dir = std::env::temp_dir().join(format!("kpf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "kind: Service\nmetadata: [unclosed\n").unwrap();
    let output = run(&["plan", "-f", bad.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("bad.yaml"), "{}", stderr(&output));
}

#[test]
fn bad_flags_exit_2_with_the_reason() {
    let output = run(&["plan", "-f", "examples/", "--table", "bad name"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("table name \"bad name\""),
        "{}",
        stderr(&output)
    );
    let output = run(&["plan", "-f", "examples/", "--wan-address", "not-an-ip"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--wan-address"),
        "{}",
        stderr(&output)
    );
    let output = run(&["apply", "-f", "examples/"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--wan-interface or --wan-address"));
    // Health check flags are checked before anything connects anywhere.
    for (flags, said) in [
        (
            ["--check-interval", "1", "--check-timeout", "2"],
            "--check-timeout 2 is not shorter",
        ),
        (
            ["--check-interval", "0", "--check-timeout", "2"],
            "--check-interval 0",
        ),
        (["--check-fall", "0", "--check-rise", "2"], "--check-fall"),
    ] {
        let args = [&["run", "--wan-interface", "wan"], &flags[..]].concat();
        let output = run(&args);
        assert_eq!(output.status.code(), Some(2));
        assert!(stderr(&output).contains(said), "{}", stderr(&output));
    }
    // So are the upstream ones.
    for (flags, said) in [
        (
            &["--upstream-url", "http://192.168.1.1:5000/rootDesc.xml"][..],
            "--upstream-url http://192.168.1.1:5000/rootDesc.xml needs --upstream upnp",
        ),
        (
            &["--upstream", "upnp", "--upstream-url", "https://box/"][..],
            "only http:// URLs name an IGD",
        ),
        (
            &["--upstream", "upnp", "--upstream-lease", "5"][..],
            "--upstream-lease 5: give 0 (permanent) or seconds from 10",
        ),
        (
            &["--upstream", "upnp", "--upstream-poll", "0"][..],
            "--upstream-poll 0",
        ),
    ] {
        let args = [&["run", "--wan-interface", "wan"], flags].concat();
        let output = run(&args);
        assert_eq!(output.status.code(), Some(2));
        assert!(stderr(&output).contains(said), "{}", stderr(&output));
    }
}

#[test]
fn a_namespace_selector_is_matched_against_namespace_manifests_offline() {
    let yaml = "kind: Namespace\nmetadata: {name: games, labels: {router-access: \"yes\"}}\n---\n\
        kind: Namespace\nmetadata: {name: other}\n---\n\
        kind: Service\nmetadata: {name: mc, namespace: games, annotations: {kube-port-forward-controller/mapping: game}}\n\
        spec: {ports: [{name: game, port: 25565}]}\nstatus: {loadBalancer: {ingress: [{ip: 10.0.0.1}]}}\n---\n\
        kind: Service\nmetadata: {name: web, namespace: other, annotations: {kube-port-forward-controller/mapping: http}}\n\
        spec: {ports: [{name: http, port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 10.0.0.2}]}}\n";
    let output = plan_stdin(&["--allow-namespace-selector", "router-access=yes"], yaml);
    assert_eq!(output.status.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let states: Vec<(&str, &str)> = plan["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["namespace"].as_str().unwrap(),
                f["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("games", "forwarding"), ("other", "refused")]);
}

/// `plan | head -0`: a reader that closed its end before the output came is not an error of
/// the command, and nothing panics.
#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let output = Command::new(BIN)
        .args(["plan", "-f", "examples/"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}

/// `run --check`: what the daemon would refuse at start, without a cluster, a kernel or root.
#[test]
fn run_check_says_ok_or_names_the_flag_at_fault() {
    let dir = Dir::new("check");
    let dir = &dir.0;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: home\n\
         clusters: [{name: home, cluster: {server: \"https://192.0.2.1:6443\"}}]\n\
         users: [{name: router, user: {token: secret}}]\n\
         contexts: [{name: home, context: {cluster: home, user: router}}]\n",
    )
    .unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let check = |flags: &[&str]| {
        let args = [&["run", "--check", "--wan-interface", "wan"], flags].concat();
        run(&args)
    };
    let flags = ["--kubeconfig", kubeconfig, "--allow-ports", "80,443"];
    let output = check(&flags);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    // Nor as a user without privileges.
    // `/proc/self` belongs to the effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    if root {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(["run", "--check", "--wan-interface", "wan"])
            .args(flags)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }

    let missing = dir.join("missing.kubeconfig");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--allow-ports", "90-80"],
            "--allow-ports: ports \"90-80\"",
        ),
        (
            &["--allow-target", "10.0.0.0/33"],
            "--allow-target: target network \"10.0.0.0/33\"",
        ),
        (
            &["--allow-namespace-selector", "a b=c"],
            "--allow-namespace-selector: namespace selector \"a b=c\"",
        ),
        (
            &["--upstream", "upnp", "--upstream-lease", "5"],
            "--upstream-lease 5",
        ),
        (&["--kubeconfig", missing], missing),
        (
            &["--kubeconfig", kubeconfig, "--context", "elsewhere"],
            "elsewhere",
        ),
    ];
    for (flags, said) in cases {
        let output = check(flags);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{flags:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(said),
            "{flags:?}: {}",
            stderr(&output)
        );
        assert!(output.stdout.is_empty(), "{flags:?}");
    }
}

/// A temporary folder, removed on drop (a failed test's too).
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("kpf-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! Service manifests from files, a folder or standard input: YAML or JSON, several documents
//! per file, `List` and `ServiceList` objects; Namespace and Node objects for the policy's
//! namespace selector and for node ports. Objects of other kinds are passed over.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::core::node::{Node, Nodes};
use crate::core::service::{DecodeError, Service};

/// A manifest that could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not valid YAML or JSON: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: no .yaml, .yml or .json files in this folder")]
    EmptyFolder { file: String },
}

/// An object that is a Service but cannot be used as one.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {error}")]
pub struct Refused {
    pub file: String,
    #[source]
    pub error: DecodeError,
}

/// What a set of manifests holds.
#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    /// Service objects that could not be decoded; the other objects are still read.
    pub refused: Vec<Refused>,
    /// Namespace objects, with their labels (for a policy's namespace selector).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Node objects (for forwards to node ports); those that cannot be read take no traffic.
    pub nodes: Nodes,
    /// Objects of other kinds, passed over.
    pub skipped: usize,
}

/// Reads `-` (standard input), a file, or the manifest files directly inside a folder, in
/// name order.
pub fn read(path: &Path) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| ManifestError::Read {
                file: "<stdin>".into(),
                source,
            })?;
        parse_into(&mut manifests, "<stdin>", &text)?;
        return Ok(manifests);
    }
    let label = path.display().to_string();
    let read_err = |source| ManifestError::Read {
        file: label.clone(),
        source,
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(read_err)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        if files.is_empty() {
            return Err(ManifestError::EmptyFolder { file: label });
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    for file in files {
        let label = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            file: label.clone(),
            source,
        })?;
        parse_into(&mut manifests, &label, &text)?;
    }
    Ok(manifests)
}

/// Parses the text of one manifest file.
pub fn parse(file: &str, text: &str) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    parse_into(&mut manifests, file, text)?;
    Ok(manifests)
}

fn parse_into(out: &mut Manifests, file: &str, text: &str) -> Result<(), ManifestError> {
    let syntax = |message: String| ManifestError::Syntax {
        file: file.to_owned(),
        message,
    };
    // JSON is YAML too, but a JSON reader is much faster on large `kubectl get -o json`
    // dumps, and reads a stream of JSON documents.
    let documents: Vec<serde_json::Value> = if text.trim_start().starts_with(['{', '[']) {
        serde_json::Deserializer::from_str(text)
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| syntax(e.to_string()))?
    } else {
        // The parser's default budget (1,024 documents, 250,000 nodes) is made for config
        // files; a dump of a cluster's Services is larger. These limits still bound the
        // work a hostile file can cause, at about 100 times what 10,000 Services need.
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_documents: 1_000_000,
                max_nodes: 50_000_000,
                max_events: 100_000_000,
            },
        };
        serde_saphyr::from_multiple_with_options(text, options)
            .map_err(|e| syntax(e.to_string()))?
    };
    for document in documents {
        collect(out, file, document, None);
    }
    Ok(())
}

fn collect(out: &mut Manifests, file: &str, document: serde_json::Value, item_kind: Option<&str>) {
    if document.is_null() {
        return;
    }
    let kind = document["kind"]
        .as_str()
        .or(item_kind)
        .unwrap_or_default()
        .to_owned();
    match kind.as_str() {
        "List" | "ServiceList" => {
            let item_kind = (kind == "ServiceList").then_some("Service");
            if let serde_json::Value::Object(mut object) = document
                && let Some(serde_json::Value::Array(items)) = object.remove("items")
            {
                for item in items {
                    collect(out, file, item, item_kind);
                }
            }
        }
        "Namespace" => {
            let meta = &document["metadata"];
            if let Some(name) = meta["name"].as_str() {
                let labels = meta["labels"]
                    .as_object()
                    .map(|l| {
                        l.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default();
                out.namespaces.insert(name.to_owned(), labels);
            }
        }
        "Node" => {
            if let Some(node) = Node::decode(document) {
                out.nodes.insert(node.name.clone(), node);
            }
        }
        "Service" => match Service::decode(document) {
            Ok(service) => out.services.push(service),
            Err(error) => out.refused.push(Refused {
                file: file.to_owned(),
                error,
            }),
        },
        _ => out.skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_lists_and_other_kinds() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: x}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: c}
---
"#;
        let m = parse("f.yaml", text).unwrap();
        let names: Vec<_> = m.services.iter().map(Service::key).collect();
        assert_eq!(names, vec!["x/a", "default/b"]);
        assert_eq!(m.skipped, 2);
    }

    #[test]
    fn service_list_items_have_no_kind() {
        let text = r#"{"kind":"ServiceList","apiVersion":"v1","items":[{"metadata":{"name":"k","namespace":"default"}}]}"#;
        let m = parse("f.json", text).unwrap();
        assert_eq!(m.services.len(), 1);
    }

    #[test]
    fn a_bad_service_names_file_object_field_and_others_still_read() {
        let text = "kind: Service\nmetadata: {name: bad, namespace: ns}\nspec: {ports: [{port: x}]}\n---\nkind: Service\nmetadata: {name: good}\n";
        let m = parse("svc.yaml", text).unwrap();
        assert_eq!(m.services.len(), 1);
        let message = m.refused[0].to_string();
        assert!(message.contains("svc.yaml"), "{message}");
        assert!(message.contains("ns/bad"), "{message}");
        assert!(message.contains("spec.ports[0].port"), "{message}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = parse("broken.yaml", "kind: Service\n  metadata: [").unwrap_err();
        assert!(err.to_string().starts_with("broken.yaml: "), "{err}");
    }
}

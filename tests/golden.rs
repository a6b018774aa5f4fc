//! Golden tests: each `tests/golden/NAME.yaml` planned by the real binary must print
//! `tests/golden/NAME.txt` exactly. Run with `UPDATE_GOLDEN=1` to rewrite the expected files
//! on purpose, then review the diff.

mod common;

use std::path::Path;
use std::process::Command;

use common::{DUAL_STACK_WAN, output_ok};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

fn plan(manifest: &Path, extra: &[&str]) -> String {
    output_ok(
        Command::new(BIN)
            .args(["plan", "-f"])
            .arg(manifest)
            .args(DUAL_STACK_WAN)
            .args(extra),
    )
}

#[test]
fn plans_match_the_checked_in_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 4,
        "golden cases missing in {}",
        dir.display()
    );
    let mut drifted = Vec::new();
    for case in cases {
        for (suffix, extra) in [("txt", &[][..]), ("json", &["--output", "json"][..])] {
            let actual = plan(&case, extra).replace(dir.to_str().unwrap(), "tests/golden");
            let expected_path = case.with_extension(suffix);
            if update {
                std::fs::write(&expected_path, &actual).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
            if actual != expected {
                drifted.push(format!(
                    "{} differs; expected:\n{expected}\nactual:\n{actual}",
                    expected_path.display()
                ));
            }
        }
    }
    assert!(
        drifted.is_empty(),
        "{}\nRun with UPDATE_GOLDEN=1 to accept.",
        drifted.join("\n")
    );
}

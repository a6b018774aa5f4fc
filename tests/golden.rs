//! Golden tests: each `tests/golden/NAME.yaml` planned by the real binary must print
//! `tests/golden/NAME.txt` exactly. Run with `UPDATE_GOLDEN=1` to rewrite the expected files
//! on purpose, then review the diff.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

fn plan(manifest: &Path, extra: &[&str]) -> String {
    let output = Command::new(BIN)
        .args(["plan", "-f"])
        .arg(manifest)
        .args([
            "--wan-interface",
            "wan",
            "--wan-address",
            "203.0.113.1,2001:db8:1::1",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
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

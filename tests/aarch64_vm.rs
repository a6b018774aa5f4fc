//! The host side of `bench/aarch64-vm.sh`: the test API server for the daemon that runs in
//! the emulated aarch64 guest. The guest reaches the host's 127.0.0.1 at 10.0.2.2 and the
//! server by a host name from its /etc/hosts. Host and guest meet through files in the
//! share `KPF_VM_SHARE` (see bench/aarch64-vm/guest.sh). Ignored: the script runs it beside
//! the guest; it needs no root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::SERVER4;
use common::apiserver::ApiServer;
use common::scenario::{FINALIZER, finalizers, service};

/// The name the guest's /etc/hosts gives the host.
const API_HOST: &str = "apiserver.kpf.test";

/// Writes `host-failed` into the share if the test panics, so the guest stops waiting.
struct Share {
    dir: PathBuf,
}

impl Share {
    /// Writes `name` whole: the guest never reads half a file.
    fn signal(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        eprintln!("host: {name}");
    }

    fn has(&self, name: &str) -> bool {
        Path::new(&self.dir).join(name).exists()
    }

    /// Waits for the guest's file `name`; fails at once if the guest said it failed.
    fn wait_file(&self, name: &str, seconds: u64) {
        wait(&format!("the guest's {name}"), seconds, || {
            assert!(
                !self.has("guest-failed"),
                "the guest failed while the host waited for {name}"
            );
            self.has(name)
        });
        eprintln!("guest: {name}");
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::fs::write(self.dir.join("host-failed"), "the host test panicked\n");
        }
    }
}

/// Polls `condition` until it holds; the deadlines are long, as everything in the guest is
/// emulated.
fn wait(what: &str, seconds: u64, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "run by bench/aarch64-vm.sh beside the emulated aarch64 guest"]
fn the_guest_forwards_a_service_and_releases_it_when_deleted() {
    let share = Share {
        dir: PathBuf::from(std::env::var("KPF_VM_SHARE").expect("KPF_VM_SHARE is set")),
    };
    let api = ApiServer::new();
    let addr = api.listen(None);
    let kubeconfig = ApiServer::kubeconfig_at(&format!("{API_HOST}:{}", addr.port()));
    assert!(kubeconfig.contains(API_HOST));
    share.signal("kubeconfig", &kubeconfig);

    // The guest boots, installs, and runs its other steps first.
    share.wait_file("daemon-ready", 1500);
    api.create(service("web", "80:http", 8080));
    api.set_lb_ips("apps", "web", &[SERVER4]);
    share.wait_file("forward-carried", 300);
    wait("the finalizer", 300, || {
        finalizers(&api, "web") == [FINALIZER]
    });
    wait("the Forwarded condition", 300, || {
        let s = api.get("apps", "web").unwrap();
        s["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["type"] == "kube-port-forward-controller/aarch64" && c["status"] == "True"
            })
        })
    });

    assert_eq!(api.delete("apps", "web"), http::StatusCode::OK);
    // Gone once the daemon took the rule out of the kernel and released its finalizer.
    wait("the Service to go", 300, || {
        api.get("apps", "web").is_none()
    });
    share.signal("service-gone", "");
    share.wait_file("forward-removed", 300);

    let reasons: Vec<String> = api
        .events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    for reason in ["PortsOpened", "PortsClosed"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }
}

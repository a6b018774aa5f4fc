//! The real binary running `run` inside a router namespace, against a test API server.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::apiserver::ApiServer;
use super::{Netns, ROUTER_WAN4, TempDir, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

/// A running daemon, killed (SIGKILL) on drop; its log is printed if the test fails.
pub struct Daemon {
    child: Child,
    log: String,
    /// Its `--status-file`, in the test's folder.
    pub status_file: String,
}

impl Daemon {
    /// Starts `run` in `router` with a kubeconfig for `api`, WAN `wan`/`ROUTER_WAN4`, the
    /// instance name `name`, and `args`; output goes to `dir/NAME.log`.
    pub fn spawn(
        router: &Netns,
        dir: &TempDir,
        api: SocketAddr,
        name: &str,
        args: &[&str],
    ) -> Daemon {
        let wan = ["--wan-interface", "wan", "--wan-address", ROUTER_WAN4];
        Daemon::spawn_with(router, dir, api, name, &[&wan, args].concat(), &[])
    }

    /// Starts `run` with only the flags given (no WAN ones added, a status file in `dir`)
    /// and `env` set.
    pub fn spawn_with(
        router: &Netns,
        dir: &TempDir,
        api: SocketAddr,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let kubeconfig = dir.write(&format!("{name}.kubeconfig"), &ApiServer::kubeconfig(api));
        let log = dir.path.join(format!("{name}.log")).display().to_string();
        let status_file = dir
            .path
            .join(format!("{name}.status.json"))
            .display()
            .to_string();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &router.name,
                BIN,
                "run",
                "--kubeconfig",
                &kubeconfig,
            ])
            .args(["--instance", name, "--status-file", &status_file])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon {
            child,
            log,
            status_file,
        }
    }

    /// Starts `run` as router `name` following the interface `wan` (no fixed address), with
    /// the default finalizer, its own condition type and `extra` flags; returns once ready.
    pub fn on_wan_interface(
        router: &Netns,
        dir: &TempDir,
        api: SocketAddr,
        name: &str,
        extra: &[&str],
    ) -> Daemon {
        let condition = format!("kube-port-forward-controller/{name}");
        let mut args = vec![
            "--wan-interface",
            "wan",
            "--finalizer",
            "kube-port-forward-controller/finalizer",
            "--condition-type",
            &condition,
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::spawn_with(router, dir, api, name, &args, &[]);
        daemon.wait_log("ready");
        daemon
    }

    /// The daemon's process id (`ip netns exec` executes it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, text: &str) {
        wait_for(&format!("\"{text}\" in the daemon's log"), || {
            self.log().contains(text)
        });
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- daemon log {} ---\n{}", self.log, self.log());
        }
    }
}

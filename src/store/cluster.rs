//! A throwaway PostgreSQL cluster for tests, benchmarks and the demo:
//! `initdb` into a fresh directory, a free port on 127.0.0.1, password
//! authentication, stopped and removed on drop. Never for production: the
//! region's database is the operator's.
//!
//! PostgreSQL refuses to run as root; as root the cluster runs as the
//! `postgres` system user (Debian's package creates it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The role and database the brokers use.
pub const ROLE: &str = "sovkms";

/// Why a throwaway cluster could not be made, started, stopped or asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// PostgreSQL's server programs are not on this machine.
    #[error("PostgreSQL is not installed: {0} (apt install postgresql; deploy/deps.sh does)")]
    NotInstalled(&'static str),
    /// A file or directory of the cluster, or a free port.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A PostgreSQL program (or `runuser`, `chown`) failed; its output.
    #[error("{program} failed: {output}")]
    Program {
        /// The program.
        program: String,
        /// What it printed.
        output: String,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ClusterError {
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster.
pub struct ThrowawayCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
    running: bool,
}

fn bindir() -> Result<PathBuf, ClusterError> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| ClusterError::NotInstalled("no /usr/lib/postgresql"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or(ClusterError::NotInstalled(
            "no initdb under /usr/lib/postgresql",
        ))
}

fn free_port() -> Result<u16, ClusterError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("no free port"))
}

impl ThrowawayCluster {
    /// Creates and starts a cluster with the role [`ROLE`] (password
    /// [`password`](Self::password)) and a database of the same name.
    pub fn start() -> Result<Self, ClusterError> {
        let bin = bindir()?;
        let run_as = rustix::process::geteuid().is_root().then_some("postgres");
        let dir = tempfile::Builder::new()
            .prefix("sovkms-pg-")
            .tempdir()
            .map_err(io("cluster directory"))?;
        let mut c = Self {
            dir,
            bin,
            port: 0,
            run_as,
            running: false,
        };
        std::fs::write(c.password_file(), c.password()).map_err(io("password file"))?;
        if let Some(user) = run_as {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(io("cluster directory"))?;
            c.run(Command::new("chown").args(["-R", &format!("{user}:"), &c.path_str()]))?;
        }
        let data = c.data();
        let pw = c.password_file().display().to_string();
        c.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                ROLE,
                "--pwfile",
                &pw,
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        )?;
        c.start_again()?;
        c.sql("postgres", &format!("CREATE DATABASE {ROLE}"))?;
        Ok(c)
    }

    fn path_str(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, cmd: &mut Command) -> Result<String, ClusterError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let out = cmd.output().map_err(|e| ClusterError::Program {
            program: program.clone(),
            output: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(ClusterError::Program {
                program,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a PostgreSQL program (as the cluster's user).
    fn pg(&self, program: &str, args: &[&str]) -> Result<String, ClusterError> {
        let exe = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(args).current_dir(self.dir.path());
        self.run(&mut cmd)
    }

    /// Starts the (stopped) cluster again, on a new free port the first
    /// time (another port if that one was taken meanwhile).
    pub fn start_again(&mut self) -> Result<(), ClusterError> {
        if self.port != 0 {
            return self.start_on_port();
        }
        let mut tries = 0;
        loop {
            self.port = free_port()?;
            match self.start_on_port() {
                Ok(()) => return Ok(()),
                Err(e) if tries == 2 => return Err(e),
                Err(_) => tries += 1,
            }
        }
    }

    fn start_on_port(&mut self) -> Result<(), ClusterError> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.path_str()
        );
        let data = self.data();
        let log = self.dir.path().join("log").display().to_string();
        self.pg(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &opts, "start"],
        )?;
        self.running = true;
        Ok(())
    }

    /// Stops the cluster (fast shutdown: sessions are ended).
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        let data = self.data();
        self.pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    /// Runs SQL in `database` as [`ROLE`]; returns psql's unaligned output.
    pub fn sql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let psql = self.bin.join("psql");
        self.run(
            Command::new(psql)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    ROLE,
                    "-d",
                    database,
                    "-c",
                    sql,
                ])
                .env("PGPASSWORD", self.password()),
        )
    }

    /// The role's password (a throwaway cluster's: not a secret).
    pub fn password(&self) -> &'static str {
        "throwaway-cluster-password"
    }

    /// A file holding the password (for `store.password_file`).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// The URL of `database` (no password: it is in the file).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's processes (the postmaster and its children), for
    /// charging their CPU time to a benchmark's requests.
    pub fn pids(&self) -> Vec<u32> {
        let pm = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok());
        let Some(pm) = pm else { return Vec::new() };
        let mut out = vec![pm];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pm) {
                out.push(pid);
            }
        }
        out
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Directory of the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

//! A KMS for integration tests: `tests/fixtures/kms_fixture.py` runs moto's KMS server and a
//! fault-injecting proxy in front of it, and takes commands (create a key, inject a fault,
//! count calls) as JSON lines on its stdin. It exits when its stdin closes, so it never
//! outlives the test process; dropping the fixture also kills it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use serde_json::{json, Value};

pub struct KmsFixture {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub moto_port: u16,
    pub proxy_port: u16,
    /// An empty AWS config file, so the host's ~/.aws never leaks into a test.
    aws_config: tempfile::NamedTempFile,
}

impl KmsFixture {
    pub fn start() -> KmsFixture {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kms_fixture.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install the test dependencies with tests/run.sh"));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ports: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("KMS fixture did not start ({e}): {line:?}; is moto[server] installed?"));
        KmsFixture {
            child,
            stdin,
            stdout,
            moto_port: ports["moto"].as_u64().unwrap() as u16,
            proxy_port: ports["proxy"].as_u64().unwrap() as u16,
            aws_config: tempfile::NamedTempFile::new().unwrap(),
        }
    }

    pub fn cmd(&mut self, v: Value) -> Value {
        writeln!(self.stdin, "{v}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("fixture answered {line:?}: {e}"));
        assert!(answer.get("error").is_none(), "fixture command {v} failed: {answer}");
        answer
    }

    pub fn create_key(&mut self, region: &str) -> String {
        self.cmd(json!({"cmd": "create-key", "region": region}))["arn"].as_str().unwrap().to_owned()
    }

    /// Adds a fault rule (see the fixture's docstring): `{"op": "Decrypt", "kind": "error", ...}`.
    pub fn fault(&mut self, mut rule: Value) {
        rule["cmd"] = json!("fault");
        self.cmd(rule);
    }

    pub fn clear_faults(&mut self) {
        self.cmd(json!({"cmd": "clear"}));
    }

    /// How many requests of operation `op` the proxy has seen.
    pub fn count(&mut self, op: &str) -> u64 {
        self.cmd(json!({"cmd": "stats"}))[op].as_u64().unwrap_or(0)
    }

    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy_port)
    }

    pub fn moto_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_port)
    }

    /// Sets up `cmd` to reach KMS at `endpoint` (through `AWS_ENDPOINT_URL_KMS`) with dummy
    /// credentials, and nothing of the host's AWS configuration.
    pub fn configure(&self, cmd: &mut Command, endpoint: Option<&str>) {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        let cfg = self.aws_config.path();
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", cfg)
            .env("AWS_SHARED_CREDENTIALS_FILE", cfg)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NBDCRYPT_LOG", "info")
            .env_remove("NBDCRYPT_DEVICE_ID")
            .env_remove("NBDCRYPT_KMS_ENDPOINT")
            .env_remove("NBDCRYPT_KMS_TIMEOUT");
        if let Some(e) = endpoint {
            cmd.env("AWS_ENDPOINT_URL_KMS", e);
        }
    }

    /// Runs nbdcrypt against the proxy (so faults apply and calls are counted).
    pub fn nbdcrypt(&self, args: &[&str]) -> Output {
        self.nbdcrypt_at(&self.proxy_url(), args)
    }

    /// Runs nbdcrypt against KMS at `endpoint`.
    pub fn nbdcrypt_at(&self, endpoint: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(super::bin());
        self.configure(&mut cmd, Some(endpoint));
        cmd.args(args).stdin(Stdio::null()).output().expect("run nbdcrypt")
    }
}

impl Drop for KmsFixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A closed local port: connecting to it is refused at once (an endpoint that is down).
pub fn closed_endpoint() -> String {
    format!("http://127.0.0.1:{}", super::free_port())
}

/// A volume file of `size` bytes in a temp dir, formatted with `key` (an `aws-kms:` or
/// `local:` spec) through the fixture's proxy.
pub struct KmsVolume {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
}

impl KmsVolume {
    pub fn format(kms: &KmsFixture, size: u64, sector_size: u32, key: &str, extra: &[&str]) -> KmsVolume {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vol.img");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let ss = sector_size.to_string();
        let mut args = vec!["format", image.to_str().unwrap(), "--key", key, "--sector-size", &ss];
        args.extend_from_slice(extra);
        super::check(kms.nbdcrypt(&args), "format");
        KmsVolume { dir, image }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn image(&self) -> &str {
        self.image.to_str().unwrap()
    }
}

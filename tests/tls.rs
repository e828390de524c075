//! TLS (NBD_OPT_STARTTLS) against real TLS clients: libnbd (`nbdinfo`, `nbdcopy` over
//! `nbds://`), qemu's GnuTLS client (`qemu-io`/`qemu-img` with `tls-creds-x509`), and a raw
//! client (plain, and rustls for the negotiation-state reset).
//!
//! Certificates are made per test with the `openssl` CLI (see [`Pki::new`]): a CA, a server
//! certificate for `localhost` and `127.0.0.1`, and a client certificate, laid out as libnbd's
//! `tls-certificates` and qemu's `tls-creds-x509 dir=` expect (`ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem`). qemu (GnuTLS) insists on `keyEncipherment` in the
//! key usage of both end certificates, even for EC keys.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::raw::*;
use common::*;
use tokio_rustls::rustls;

/// Test PKI: `dir/pki` holds everything; `dir/client-full` what a client with a certificate
/// needs; `dir/client-anon` only the CA.
struct Pki {
    pki: PathBuf,
    full: PathBuf,
    anon: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); install the test dependencies with tests/run.sh"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    fn new(root: &Path) -> Pki {
        let pki = root.join("pki");
        let full = root.join("client-full");
        let anon = root.join("client-anon");
        for d in [&pki, &full, &anon] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        // CA
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nbdcrypt test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&a, &pki);
        // Server and client: key + CSR, signed by the CA with the right extensions.
        for (name, cn, ext) in [
            ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("client", "nbdcrypt test client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let key = format!("{name}-key.pem");
            let csr = format!("{name}.csr");
            let cert = format!("{name}-cert.pem");
            let extfile = format!("{name}.ext");
            std::fs::write(
                pki.join(&extfile),
                format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"),
            )
            .unwrap();
            let subj = format!("/CN={cn}");
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&a, &pki);
            openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca-cert.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &extfile,
                ],
                &pki,
            );
        }
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::fs::copy(pki.join(f), full.join(f)).unwrap();
        }
        std::fs::copy(pki.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
        Pki { pki, full, anon }
    }

    fn server_args(&self, mode: &str, verify_clients: bool) -> Vec<String> {
        let mut a = vec![
            "--tls".into(),
            mode.into(),
            "--tls-cert".into(),
            self.pki.join("server-cert.pem").display().to_string(),
            "--tls-key".into(),
            self.pki.join("server-key.pem").display().to_string(),
        ];
        if verify_clients {
            a.push("--tls-ca".into());
            a.push(self.pki.join("ca-cert.pem").display().to_string());
        }
        a
    }
}

fn start(vol: &Volume, pki: &Pki, mode: &str, verify_clients: bool) -> Daemon {
    let args = pki.server_args(mode, verify_clients);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(vol, &args)
}

fn nbds(d: &Daemon, dir: &Path) -> String {
    format!("nbds://127.0.0.1:{}/t?tls-certificates={}", d.port, dir.display())
}

fn output(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn nbdinfo_and_nbdcopy_over_nbds() {
    let vol = Volume::new(16 << 20, 4096);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "require", false);
    let uri = nbds(&d, &pki.anon);
    let out = check(run("nbdinfo", &["--json", &uri]), "nbdinfo over TLS");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["TLS"], true, "{v}");
    assert_eq!(v["exports"][0]["export-size"], (16u64 << 20) - (2 << 20));
    let data = pseudo_random(8 << 20, 11);
    let src = vol.path("src.bin");
    std::fs::write(&src, &data).unwrap();
    check(run("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]), "nbdcopy in over TLS");
    let dst = vol.path("dst.bin");
    check(run("nbdcopy", &[&uri, dst.to_str().unwrap()]), "nbdcopy out over TLS");
    assert_eq!(sha256_hex(&std::fs::read(&dst).unwrap()[..8 << 20]), sha256_hex(&data));
    assert!(d.log_text().contains("\"tls\":true"), "the log records TLS connections");
    assert_eq!(d.stop(), 0);
}

#[test]
fn qemu_tls_client_writes_and_reads() {
    let vol = Volume::new(8 << 20, 512);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "require", true);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.full.display());
    let image = format!("driver=nbd,host=127.0.0.1,port={},export=t,tls-creds=tls0", d.port);
    let out = check(
        run(
            "qemu-io",
            &[
                "--object",
                &object,
                "--image-opts",
                &image,
                "-c",
                "write -P 0x5a 4096 65536",
                "-c",
                "read -P 0x5a 4096 65536",
                "-c",
                "flush",
            ],
        ),
        "qemu-io over TLS",
    );
    assert!(!output(&out).contains("failed"), "{}", output(&out));
    let out = check(run("qemu-img", &["info", "--object", &object, "--image-opts", &image]), "qemu-img info over TLS");
    assert!(output(&out).contains("virtual size"), "{}", output(&out));
    assert_eq!(d.stop(), 0);
}

#[test]
fn client_certificate_is_required_when_a_ca_is_configured() {
    let vol = Volume::new(4 << 20, 4096);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "require", true);
    let out = run("nbdinfo", &[&nbds(&d, &pki.anon)]);
    assert!(!out.status.success(), "a client without a certificate got in: {}", output(&out));
    // The client can exit before the server has logged the failed handshake.
    d.wait_for_log("TLS handshake failed");
    check(run("nbdinfo", &[&nbds(&d, &pki.full)]), "nbdinfo with a client certificate");
    assert_eq!(d.stop(), 0);
}

#[test]
fn plain_client_against_require_mode_gets_tls_reqd() {
    let vol = Volume::new(4 << 20, 4096);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "require", false);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    for (code, data) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_INFO, info_data(b"t", &[])),
        (OPT_GO, info_data(b"t", &[])),
        (OPT_LIST_META_CONTEXT, meta_data(b"t", &[])),
        (0x4242, b"x".to_vec()),
    ] {
        c.option(code, &data);
        let r = c.reply();
        assert_eq!((r.option, r.kind), (code, REP_ERR_TLS_REQD), "option {code}");
    }
    c.option(OPT_EXPORT_NAME, b"t");
    assert!(c.is_closed(), "EXPORT_NAME before TLS closes the connection");
    let out = run("nbdinfo", &[&format!("nbd://127.0.0.1:{}/t", d.port)]);
    assert!(!out.status.success(), "a plain client got in: {}", output(&out));
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK, "ABORT is answered before TLS");
    assert_eq!(d.stop(), 0);
}

#[test]
fn optional_mode_serves_plain_and_tls_clients() {
    let vol = Volume::new(4 << 20, 4096);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "optional", false);
    let out = check(run("nbdinfo", &["--json", &d.uri]), "plain nbdinfo");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["TLS"], false);
    let out = check(run("nbdinfo", &["--json", &nbds(&d, &pki.anon)]), "nbdinfo over TLS");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["TLS"], true);
    assert_eq!(d.stop(), 0);
}

fn rustls_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
fn starttls_resets_negotiation_state() {
    let vol = Volume::new(4 << 20, 4096);
    let pki = Pki::new(vol.dir.path());
    let d = start(&vol, &pki, "optional", false);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    // Structured replies before STARTTLS: forgotten by the upgrade.
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(rustls_client(&pki.anon.join("ca-cert.pem")), name).unwrap();
    let mut t = Raw { s: rustls::StreamOwned::new(conn, c.s) };
    t.option(OPT_STARTTLS, &[]);
    assert_eq!(t.reply().kind, REP_ERR_INVALID, "a second STARTTLS is invalid");
    let info = t.go("t");
    assert_eq!(info.flags & TF_SEND_DF, 0, "structured replies were reset: no DF");
    t.request(0, CMD_READ, 5, 0, 512, &[]);
    assert_eq!(t.simple(), (0, 5), "a simple reply: structured replies were not kept");
    assert_eq!(t.read_n(512).len(), 512);
    t.disconnect();
    assert_eq!(d.stop(), 0);
}

#[test]
fn bad_tls_files_stop_the_start_and_are_named() {
    let vol = Volume::new(4 << 20, 4096);
    let missing = vol.path("nope.pem");
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let out = nbdcrypt(&[
        "serve",
        vol.image.to_str().unwrap(),
        "--kek-file",
        vol.kek.to_str().unwrap(),
        "--listen",
        &listen,
        "--tls-cert",
        missing.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    assert!(output(&out).contains("nope.pem"), "{}", output(&out));
}

//! TLS against real listeners: `amqps://` to the system RabbitMQ through a
//! TLS listener added at run time, and `rediss://` to a `redis-server` of
//! the test's own, both with certificates made here by the `openssl` CLI
//! (a CA, a server certificate for 127.0.0.1 and localhost, a client
//! certificate, and an unrelated "wrong" CA).
//!
//! Both listeners demand a client certificate, so the identity path is
//! exercised, not just the roots. A real `pleura-worker` process serves
//! scans with only TLS connections; the `pleura` CLI submits and reads over
//! TLS; and a wrong CA, the system roots, or a missing client certificate
//! are refused with errors that say why.
//!
//! RabbitMQ's listener is started with `rabbit_networking:start_ssl_listener`
//! through `rabbitmqctl eval`, with the certificates passed inline (the
//! broker runs as another user, who could not read the test's files). Each
//! test replaces whatever listener is on the port (its own certificates are
//! new) and stops it when done, holding [`AMQPS`] meanwhile; one left over
//! by a killed run is replaced the same way, and one lost to a broker app
//! restart is simply made again. It needs root (the Erlang cookie); without
//! it, or without `openssl` or a TLS-capable `redis-server`, tests print
//! SKIP.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pleura::config::Settings;
use pleura::fleet::broker::{self, Publisher};
use pleura::fleet::{ResultStore, DEFAULT_DELIVERY_LIMIT};
use pleura::tls::{ClientTls, PemFiles};
use pleura::wire::{Priority, Status};
use pleura_tests::*;

/// Where the broker's TLS listener goes (IANA's amqps port).
const AMQPS_PORT: u16 = 5671;

/// One test at a time owns the broker's TLS listener, since each one
/// replaces it with its own certificates.
static AMQPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The certificates of one run, in a temporary folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).expect("pki file")
    }

    /// `ca.pem`, `server.{pem,key}` (127.0.0.1, localhost), `client.{pem,key}`
    /// (both signed by `ca`), and `wrong-ca.pem`, a CA that signed nothing
    /// here. Keys are P-256, quick to make.
    fn generate() -> Result<Pki, String> {
        let pki = Pki {
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        let p = |n: &str| pki.path(n).to_string_lossy().into_owned();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (ca, cn) in [("ca", "Pleura test CA"), ("wrong-ca", "Unrelated CA")] {
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
            args.extend(ec);
            let (key, pem, subj) = (
                p(&format!("{ca}.key")),
                p(&format!("{ca}.pem")),
                format!("/CN={cn}"),
            );
            args.extend(["-keyout", &key, "-out", &pem, "-subj", &subj]);
            openssl(&args)?;
        }
        for (leaf, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, extfile) = (
                p(&format!("{leaf}.key")),
                p(&format!("{leaf}.csr")),
                p(&format!("{leaf}.pem")),
                p(&format!("{leaf}.ext")),
            );
            std::fs::write(&extfile, format!("basicConstraints=CA:FALSE\n{ext}"))
                .map_err(|e| e.to_string())?;
            let mut args = vec!["req", "-nodes"];
            args.extend(ec);
            let subj = format!("/CN=pleura-{leaf}");
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&args)?;
            let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &extfile,
            ])?;
        }
        Ok(pki)
    }

    /// TLS material as the settings would read it.
    fn tls(&self, ca: &str, client: bool) -> ClientTls {
        let (ca, cert, key) = (
            self.path(ca),
            self.path("client.pem"),
            self.path("client.key"),
        );
        ClientTls::from_files(&PemFiles {
            settings: "test_tls",
            ca_file: Some(&ca),
            cert_file: client.then_some(cert.as_path()),
            key_file: client.then_some(key.as_path()),
        })
        .expect("the test's PEM files are good")
    }

    /// `PLEURA_*` variables for both services with `ca` and the client
    /// certificate.
    fn env(&self, ca: &str) -> Vec<(String, String)> {
        let f = |n: &str| self.path(n).to_string_lossy().into_owned();
        let mut env = Vec::new();
        for service in ["AMQP", "REDIS"] {
            env.push((format!("PLEURA_{service}_TLS_CA_FILE"), f(ca)));
            env.push((format!("PLEURA_{service}_TLS_CERT_FILE"), f("client.pem")));
            env.push((format!("PLEURA_{service}_TLS_KEY_FILE"), f("client.key")));
        }
        env
    }
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The test's own Redis: a plain port for the fixtures (namespace clean-up)
/// and a TLS port that demands a client certificate from `ca`. Both serve
/// the same data. Killed when dropped.
struct TlsRedis {
    plain: u16,
    tls: u16,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> Result<TlsRedis, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (plain, tls) = (free_port(), free_port());
        let log = dir.path().join("redis.log");
        let mut child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--port")
            .arg(plain.to_string())
            .arg("--tls-port")
            .arg(tls.to_string())
            .arg("--tls-cert-file")
            .arg(pki.path("server.pem"))
            .arg("--tls-key-file")
            .arg(pki.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .args(["--tls-auth-clients", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        // Up when the plain port answers PING; a redis-server without TLS
        // support exits at once, complaining about the tls-port.
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server exited ({status})"));
                }
                if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{plain}/0")) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        if redis::cmd("PING")
                            .query_async::<String>(&mut c)
                            .await
                            .is_ok()
                        {
                            return Ok(());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| Err("redis-server not up within 20 s".into()));
        if let Err(why) = up {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(format!("{why}: {}", tail.join(" | ")));
        }
        Ok(TlsRedis {
            plain,
            tls,
            _child: child,
            _dir: dir,
        })
    }

    fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.plain)
    }

    fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.tls)
    }
}

/// The test broker's URL on its TLS port, when it is this machine's.
fn amqps_url() -> Option<String> {
    let url = amqp_url();
    let rest = url.strip_prefix("amqp://")?;
    let (login, rest) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(':').next()?;
    if host != "127.0.0.1" && host != "localhost" {
        return None;
    }
    let login = if login.is_empty() {
        String::new()
    } else {
        format!("{login}@")
    };
    Some(format!("amqps://{login}{host}:{AMQPS_PORT}/{vhost}"))
}

/// (Re)starts the broker's TLS listener on [`AMQPS_PORT`] with this run's
/// server certificate, demanding a client certificate from `ca`. Stopping
/// first makes it idempotent: a listener left by an earlier run (with other
/// certificates) is replaced; none at all is fine too.
async fn ensure_amqps_listener(pki: &Pki) -> Result<(), String> {
    // PEM is base64 and dashes: safe inside an Erlang binary literal.
    let expr = format!(
        r#"[{{'Certificate', Cert, _}} | _] = public_key:pem_decode(<<"{server}">>),
[{{KeyType, Key, _}}] = public_key:pem_decode(<<"{key}">>),
CAs = [D || {{'Certificate', D, _}} <- public_key:pem_decode(<<"{ca}">>)],
_ = (catch rabbit_networking:stop_tcp_listener({{"127.0.0.1", {port}}})),
rabbit_networking:start_ssl_listener({{"127.0.0.1", {port}}},
  [{{cert, Cert}}, {{key, {{KeyType, Key}}}}, {{cacerts, CAs}},
   {{verify, verify_peer}}, {{fail_if_no_peer_cert, true}}], 1)."#,
        server = pki.read("server.pem"),
        key = pki.read("server.key"),
        ca = pki.read("ca.pem"),
        port = AMQPS_PORT,
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "rabbitmqctl eval took over 60 s".to_string())?
    .map_err(|e| format!("rabbitmqctl: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.trim() == "ok" {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl eval start_ssl_listener: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The broker's TLS listener, this test's while it lives; stopped when
/// dropped, so the broker is left as it was found.
struct AmqpsListener {
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for AmqpsListener {
    fn drop(&mut self) {
        let expr =
            format!(r#"catch rabbit_networking:stop_tcp_listener({{"127.0.0.1", {AMQPS_PORT}}})."#);
        let Ok(mut child) = std::process::Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return;
        };
        // Bounded: a broker that does not answer must not hang the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Everything a test needs, or why it cannot run here (printed as SKIP).
struct Rig {
    pki: Pki,
    redis: TlsRedis,
    amqps: String,
    _listener: AmqpsListener,
}

impl Rig {
    async fn start() -> Result<Rig, String> {
        let amqps = amqps_url().ok_or("the test broker is not on this machine")?;
        let pki = Pki::generate()?;
        let redis = TlsRedis::start(&pki).await?;
        let listener = AmqpsListener {
            _turn: AMQPS.lock().await,
        };
        ensure_amqps_listener(&pki).await?;
        Ok(Rig {
            pki,
            redis,
            amqps,
            _listener: listener,
        })
    }

    /// The rig, or `None` after printing why the test is skipped.
    async fn start_or_skip(test: &str) -> Option<Rig> {
        match Rig::start().await {
            Ok(rig) => Some(rig),
            Err(why) => {
                skip(test, &why);
                None
            }
        }
    }
}

/// Bounded: lapin and redis both give up on a refused handshake, but a
/// regression that made them retry forever must fail here, not hang.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_scans_with_every_connection_over_tls() {
    let Some(rig) =
        Rig::start_or_skip("a_worker_serves_scans_with_every_connection_over_tls").await
    else {
        return;
    };
    // The fixtures' own connections (clean-up) use the plain port.
    let fleet = Fleet::with_redis("tls", 8, rig.redis.plain_url());
    let t0 = std::time::Instant::now();

    let mut env = rig.pki.env("ca.pem");
    env.push(("PLEURA_AMQP_URL".into(), rig.amqps.clone()));
    env.push(("PLEURA_REDIS_URL".into(), rig.redis.tls_url()));
    env.push(("PLEURA_LOG_LEVEL".into(), "debug".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let log = fleet.tmp().join("worker.log");
    let mut worker = spawn_worker_process(&fleet, &env_refs, &log);

    // Submitted over amqps:// with the library...
    let conn = within(
        "amqps connect",
        broker::connect_with_tls(&rig.amqps, "pleura-tests-tls", &rig.pki.tls("ca.pem", true)),
    )
    .await
    .expect("amqps with the right CA and a client certificate");
    let publisher = Publisher::new(&conn, fleet.names.clone(), DEFAULT_DELIVERY_LIMIT)
        .await
        .expect("publisher over TLS");
    let scans = phantoms(4, 256);
    let ids: Vec<String> = (0..4)
        .map(|i| format!("tls-{i}-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    for (id, scan) in ids.iter().zip(&scans) {
        fleet.submit(&publisher, id, scan, Priority::Routine).await;
    }
    // ...served by the worker, read back over rediss://.
    let store = within(
        "rediss connect",
        ResultStore::connect_with_tls(
            &rig.redis.tls_url(),
            &rig.pki.tls("ca.pem", true),
            fleet.names.clone(),
            3600,
            1000,
        ),
    )
    .await
    .expect("rediss with the right CA and a client certificate");
    let got = store
        .wait_all(&ids, Duration::from_secs(180), |_| {})
        .await
        .expect("read results over TLS");
    for (id, r) in ids.iter().zip(&got) {
        let r = r.as_ref().unwrap_or_else(|| {
            panic!(
                "no result for {id} within 180 s; worker log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert_eq!(r.status, Status::Ok, "{id}: {r:?}");
    }
    println!("4 scans over TLS in {:.1}s", t0.elapsed().as_secs_f64());

    // The CLI over TLS: submit-and-wait (amqps, then rediss), fleet status.
    let dir = fleet.tmp().join("scans");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, scan) in scans.iter().take(2).enumerate() {
        std::fs::write(dir.join(format!("s{i}.png")), scan).unwrap();
    }
    let mut cli_env = env_refs.clone();
    cli_env.retain(|(k, _)| *k != "PLEURA_LOG_LEVEL");
    let mut args: Vec<std::ffi::OsString> = ["submit", "--wait", "--timeout", "120", "--json"]
        .map(Into::into)
        .into();
    args.push(dir.into_os_string());
    let run = fleet.cli(args, &cli_env).await.expect_ok();
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.stdout);
    assert!(run.stdout.contains("\"status\":\"ok\""), "{}", run.stdout);
    let run = fleet
        .cli(["fleet", "status", "--json", "--require-ready"], &cli_env)
        .await
        .expect_ok();
    assert!(run.stdout.contains("\"ready\":true"), "{}", run.stdout);

    // Nothing of the key material reached the worker's log, even at debug.
    let key_line = rig
        .pki
        .read("client.key")
        .lines()
        .nth(1)
        .expect("a PEM body line")
        .to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains(&key_line),
        "the worker logged key material"
    );
    let _ = worker.start_kill();
    let _ = within("worker exit", worker.wait()).await;
    println!("TLS end to end in {:.1}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_the_system_roots_or_no_client_certificate_are_refused() {
    let Some(rig) =
        Rig::start_or_skip("a_wrong_ca_the_system_roots_or_no_client_certificate_are_refused")
            .await
    else {
        return;
    };
    let names = pleura::wire::Names::new(format!("tls-refused-{}", uuid::Uuid::new_v4().simple()));
    let redis = rig.redis.tls_url();
    let certificate_error = |e: &str| {
        let e = e.to_ascii_lowercase();
        e.contains("certificate") && (e.contains("unknownissuer") || e.contains("unknown issuer"))
    };

    // The right CA with a client certificate connects (the control)...
    within(
        "amqps",
        broker::connect_with_tls(&rig.amqps, "t", &rig.pki.tls("ca.pem", true)),
    )
    .await
    .expect("the right CA connects");

    // ...a CA that did not sign the server's certificate does not,
    let wrong = rig.pki.tls("wrong-ca.pem", true);
    let err = within(
        "amqps, wrong CA",
        broker::connect_with_tls(&rig.amqps, "t", &wrong),
    )
    .await
    .expect_err("a wrong CA must be refused")
    .to_string();
    assert!(certificate_error(&err), "amqps, wrong CA: {err}");
    println!("amqps, wrong CA: {err}");
    let err = within(
        "rediss, wrong CA",
        ResultStore::connect_with_tls(&redis, &wrong, names.clone(), 60, 10),
    )
    .await
    .err()
    .expect("a wrong CA must be refused")
    .to_string();
    assert!(certificate_error(&err), "rediss, wrong CA: {err}");
    println!("rediss, wrong CA: {err}");

    // ...nor do the system roots, which a CA bundle replaces (they do not
    // know this CA),
    let err = within("amqps, system roots", broker::connect(&rig.amqps, "t"))
        .await
        .expect_err("the system roots do not know the test CA")
        .to_string();
    assert!(certificate_error(&err), "amqps, system roots: {err}");
    let err = within(
        "rediss, system roots",
        ResultStore::connect(&redis, names.clone(), 60, 10),
    )
    .await
    .err()
    .expect("the system roots do not know the test CA")
    .to_string();
    assert!(certificate_error(&err), "rediss, system roots: {err}");

    // ...nor the right CA without the client certificate both servers demand.
    let anonymous = rig.pki.tls("ca.pem", false);
    let err = within(
        "amqps, no client certificate",
        broker::connect_with_tls(&rig.amqps, "t", &anonymous),
    )
    .await
    .expect_err("RabbitMQ demands a client certificate");
    println!("amqps, no client certificate: {err}");
    let err = within(
        "rediss, no client certificate",
        ResultStore::connect_with_tls(&redis, &anonymous, names.clone(), 60, 10),
    )
    .await
    .err()
    .expect("Redis demands a client certificate");
    println!("rediss, no client certificate: {err}");

    // The CLI says so too, and exits 1.
    let fleet = Fleet::with_redis("tls-cli", 8, rig.redis.plain_url());
    let mut env = rig.pki.env("wrong-ca.pem");
    env.push(("PLEURA_AMQP_URL".into(), rig.amqps.clone()));
    env.push(("PLEURA_REDIS_URL".into(), redis.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let run = fleet.cli(["fleet", "status"], &env).await.expect_code(1);
    assert!(certificate_error(&run.stderr), "{}", run.stderr);
    print!("pleura fleet status, wrong CA: {}", run.stderr);
}

#[test]
fn tls_settings_are_checked_when_loaded_and_errors_show_no_key() {
    let pki = match Pki::generate() {
        Ok(pki) => pki,
        Err(why) => {
            skip(
                "tls_settings_are_checked_when_loaded_and_errors_show_no_key",
                &why,
            );
            return;
        }
    };
    let f = |n: &str| pki.path(n).to_string_lossy().into_owned();
    let load = |pairs: &[(&str, String)]| {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Settings::load_from(None, env)
    };
    let amqps = (
        "PLEURA_AMQP_URL",
        "amqps://u:s3cret@mq:5671/%2f".to_string(),
    );

    // All three, matching: loads.
    let s = load(&[
        amqps.clone(),
        ("PLEURA_AMQP_TLS_CA_FILE", f("ca.pem")),
        ("PLEURA_AMQP_TLS_CERT_FILE", f("client.pem")),
        ("PLEURA_AMQP_TLS_KEY_FILE", f("client.key")),
    ])
    .expect("good TLS files load");
    assert!(s.amqp_tls().unwrap().has_client_certificate());
    assert!(!s.redis_tls().unwrap().is_configured());

    let refused = |pairs: &[(&str, String)], expect: &[&str]| {
        let err = load(pairs).expect_err("refused").to_string();
        for e in expect {
            assert!(err.contains(e), "{err:?} should mention {e:?}");
        }
        for secret in ["s3cret", "PRIVATE KEY", &pki.read("client.key")[28..60]] {
            assert!(!err.contains(secret), "{err:?} shows {secret:?}");
        }
    };
    // A certificate without its key, and a key without its certificate.
    refused(
        &[
            amqps.clone(),
            ("PLEURA_AMQP_TLS_CERT_FILE", f("client.pem")),
        ],
        &["amqp_tls_cert_file", "amqp_tls_key_file"],
    );
    refused(
        &[
            ("PLEURA_REDIS_URL", "rediss://:s3cret@cache:6380/0".into()),
            ("PLEURA_REDIS_TLS_KEY_FILE", f("client.key")),
        ],
        &["redis_tls_key_file", "redis_tls_cert_file"],
    );
    // A key that is not the certificate's.
    refused(
        &[
            amqps.clone(),
            ("PLEURA_AMQP_TLS_CERT_FILE", f("client.pem")),
            ("PLEURA_AMQP_TLS_KEY_FILE", f("server.key")),
        ],
        &["amqp_tls_cert_file", "amqp_tls_key_file"],
    );
    // A key where the CA bundle should be, a certificate for a key, a file
    // that is not there.
    refused(
        &[amqps.clone(), ("PLEURA_AMQP_TLS_CA_FILE", f("client.key"))],
        &["amqp_tls_ca_file", "no PEM certificate"],
    );
    refused(
        &[
            amqps.clone(),
            ("PLEURA_AMQP_TLS_CERT_FILE", f("client.pem")),
            ("PLEURA_AMQP_TLS_KEY_FILE", f("client.pem")),
        ],
        &["amqp_tls_key_file", "no PEM private key"],
    );
    refused(
        &[amqps.clone(), ("PLEURA_AMQP_TLS_CA_FILE", f("absent.pem"))],
        &["amqp_tls_ca_file", "absent.pem"],
    );
    // TLS files with a plain URL: a mistake that would send the password
    // in the clear.
    refused(
        &[
            ("PLEURA_AMQP_URL", "amqp://u:s3cret@mq:5672/%2f".into()),
            ("PLEURA_AMQP_TLS_CA_FILE", f("ca.pem")),
        ],
        &["amqp_url is amqp://", "amqps://"],
    );
    refused(
        &[
            ("PLEURA_REDIS_URL", "redis://:s3cret@cache:6379/0".into()),
            ("PLEURA_REDIS_TLS_CA_FILE", f("ca.pem")),
        ],
        &["redis_url is redis://", "rediss://"],
    );
    // The Debug form shows what is configured, not what it is.
    let shown = format!("{:?}", pki.tls("ca.pem", true));
    assert!(!shown.contains("BEGIN"), "{shown}");
}

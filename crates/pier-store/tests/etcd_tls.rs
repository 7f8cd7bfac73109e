//! `EtcdStore` against a real etcd serving TLS with client-certificate
//! authentication (`--client-cert-auth`), and with etcd's own users turned
//! on (`etcdctl auth enable`). Certificates come from `testing::TestPki`
//! (rcgen); etcd listens on random loopback ports.
//!
//! The attacks (finding A3: anyone who reached etcd could forge an
//! endpoint such as `node=B, ip=127.0.0.1`): each `attack_*` test tries
//! one, shows the refusal pier reports (naming what was wrong and what to
//! do), and checks with the real `etcdctl` and good credentials that the
//! forged endpoint key was not written.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use pier_store::testing::{EtcdServer, TestPki, TlsEtcdOptions};
use pier_store::{EtcdSecurity, EtcdStore, EtcdTls, EtcdUser, Store, StoreError, WatchItem};

/// The key an attacker would forge: an endpoint of node B at B's loopback.
const FORGED: &str = "/pier/v1/endpoints/default/api/b-forged";
const FORGED_VALUE: &[u8] = br#"{"node":"b","ip":"127.0.0.1","port":7370}"#;
const ROOT_PW: &str = "root-pw-7d1f";
const PIER_PW: &str = "pier-pw-93ac";
/// The CN of the good client certificate: not an etcd user, so it does
/// not log in by itself when auth is on.
const CLIENT_CN: &str = "pier-client";

fn new_pki() -> Result<Arc<TestPki>> {
    Ok(Arc::new(
        TestPki::new(CLIENT_CN).context("make test certificates")?,
    ))
}

async fn start(pki: &Arc<TestPki>, opts: TlsEtcdOptions) -> Result<EtcdServer> {
    let pki = pki.clone();
    tokio::task::spawn_blocking(move || EtcdServer::start_tls(&pki, &opts))
        .await?
        .context("start etcd with TLS")
}

/// The good TLS settings: the PKI's CA and client certificate.
fn good_tls(pki: &TestPki) -> Result<EtcdTls> {
    Ok(EtcdTls::from_files(
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
    )?)
}

fn security(tls: Option<EtcdTls>, user: Option<(&str, &str)>) -> EtcdSecurity {
    EtcdSecurity {
        tls,
        user: user.map(|(u, p)| EtcdUser::new(u, p)),
    }
}

async fn connect(etcd: &EtcdServer, sec: &EtcdSecurity) -> Result<EtcdStore, StoreError> {
    tokio::time::timeout(
        Duration::from_secs(20),
        EtcdStore::connect_with(std::slice::from_ref(&etcd.endpoint), sec),
    )
    .await
    .unwrap_or_else(|_| Err(StoreError::Unavailable("connect_with hung for 20 s".into())))
}

/// The forged key, read with `etcdctl` as root (or without a user when
/// auth is off): must be absent.
fn assert_not_forged(etcd: &EtcdServer, root: bool) -> Result<()> {
    let user = root.then(|| format!("root:{ROOT_PW}"));
    let out = etcd
        .etcdctl(user.as_deref(), &["get", FORGED, "--print-value-only"])
        .context("read the forged key with etcdctl")?;
    ensure!(
        out.trim().is_empty(),
        "the forged endpoint was written: {out:?}"
    );
    Ok(())
}

/// Expects `r` to be a refusal (`Invalid`) whose message says all of
/// `needles` (lowercase); returns the message.
fn refused<T: std::fmt::Debug>(r: Result<T, StoreError>, needles: &[&str]) -> Result<String> {
    match r {
        Err(StoreError::Invalid(m)) => {
            let l = m.to_lowercase();
            for n in needles {
                ensure!(l.contains(n), "refusal does not say {n:?}: {m}");
            }
            Ok(m)
        }
        other => bail!("expected a refusal (Invalid) saying {needles:?}, got {other:?}"),
    }
}

/// A TLS etcd with auth on: root, and `pier` with read-write on `/pier/`.
async fn etcd_with_auth(pki: &Arc<TestPki>) -> Result<EtcdServer> {
    let etcd = start(pki, TlsEtcdOptions::default()).await?;
    etcd.enable_auth(ROOT_PW)?;
    etcd.add_user(ROOT_PW, "pier", PIER_PW, "/pier/")?;
    Ok(etcd)
}

// ---- the positive path ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_and_user_works() -> Result<()> {
    let pki = new_pki()?;
    let etcd = etcd_with_auth(&pki).await?;
    let store = connect(
        &etcd,
        &security(Some(good_tls(&pki)?), Some(("pier", PIER_PW))),
    )
    .await?;
    ensure!(
        store.current_endpoint().starts_with("https://127.0.0.1:"),
        "{}",
        store.current_endpoint()
    );
    let mut w = store.watch("/pier/v1/t/", 0).await?;
    let lease = store.lease_grant(pier_store::Ttl::from_secs(5)?).await?;
    let rev = store
        .put("/pier/v1/t/a", b"1".to_vec(), Some(lease))
        .await?;
    store.lease_keepalive(lease).await?;
    let got = store.get("/pier/v1/t/a").await?.context("/pier/v1/t/a")?;
    ensure!(got.value == b"1" && got.mod_revision == rev, "{got:?}");
    let item = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .context("no watch event in 10 s")?
        .context("watch ended")??;
    match item {
        WatchItem::Events { revision, events } => {
            ensure!(revision == rev && events.len() == 1, "{events:?}")
        }
        other => bail!("expected the put, got {other:?}"),
    }
    // The real etcdctl, as root, sees what pier wrote over TLS.
    let out = etcd.etcdctl(
        Some(&format!("root:{ROOT_PW}")),
        &["get", "/pier/v1/t/a", "--print-value-only"],
    )?;
    ensure!(out.trim() == "1", "etcdctl read {out:?}");
    Ok(())
}

/// etcd's simple tokens expire when idle (`--auth-token-ttl`); etcd-client
/// renews them for unary calls, and the store renews them for watches and
/// keepalives. Idle past the TTL, every kind of call still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_auth_token_is_renewed() -> Result<()> {
    let pki = new_pki()?;
    let etcd = start(
        &pki,
        TlsEtcdOptions {
            client_cert_auth: true,
            auth_token_ttl_secs: Some(1),
        },
    )
    .await?;
    etcd.enable_auth(ROOT_PW)?;
    etcd.add_user(ROOT_PW, "pier", PIER_PW, "/pier/")?;
    let store = connect(
        &etcd,
        &security(Some(good_tls(&pki)?), Some(("pier", PIER_PW))),
    )
    .await?;
    let lease = store.lease_grant(pier_store::Ttl::from_secs(30)?).await?;
    // Idle for three token TTLs: the token is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    store
        .lease_keepalive(lease)
        .await
        .context("keepalive after token expiry")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut w = store
        .watch("/pier/v1/t/", 0)
        .await
        .context("watch after token expiry")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rev = store
        .put("/pier/v1/t/b", b"2".to_vec(), None)
        .await
        .context("put after token expiry")?;
    let item = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .context("no watch event in 10 s")?
        .context("watch ended")??;
    ensure!(
        matches!(&item, WatchItem::Events { revision, .. } if *revision == rev),
        "{item:?}"
    );
    Ok(())
}

/// A watch over TLS survives etcd restarting (the same certificates, the
/// same port): it reports the disconnection, resumes, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_over_tls_after_restart() -> Result<()> {
    let pki = new_pki()?;
    let mut etcd = start(&pki, TlsEtcdOptions::default()).await?;
    let store = connect(&etcd, &security(Some(good_tls(&pki)?), None)).await?;
    let mut w = store.watch("/pier/v1/r/", 0).await?;
    store.put("/pier/v1/r/1", b"1".to_vec(), None).await?;
    etcd = tokio::task::spawn_blocking(move || -> std::io::Result<EtcdServer> {
        etcd.restart()?;
        Ok(etcd)
    })
    .await??;
    store.put("/pier/v1/r/2", b"2".to_vec(), None).await?;
    let mut keys = Vec::new();
    let mut disconnected = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while keys.len() < 2 {
        let item = tokio::time::timeout_at(deadline, w.next())
            .await
            .with_context(|| format!("30 s, saw {keys:?}"))?
            .context("watch ended")??;
        match item {
            WatchItem::Events { events, .. } => {
                for e in events {
                    if let pier_store::WatchEvent::Put(kv) = e {
                        keys.push(kv.key);
                    }
                }
            }
            WatchItem::Disconnected { .. } => disconnected = true,
            WatchItem::Resumed => {}
        }
    }
    ensure!(keys == ["/pier/v1/r/1", "/pier/v1/r/2"], "{keys:?}");
    ensure!(disconnected, "the restart was not reported");
    drop(etcd);
    Ok(())
}

/// Failover over TLS with a user: a dead first endpoint is passed over at
/// connect, and when the current member dies the next call moves on to
/// another (a second, independent etcd here), whose client logs in on
/// first use (etcd's simple tokens are per member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_across_tls_endpoints_with_auth() -> Result<()> {
    let pki = new_pki()?;
    let mut first = etcd_with_auth(&pki).await?;
    let other = etcd_with_auth(&pki).await?;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let store = EtcdStore::connect_with(
        &[dead, first.endpoint.clone(), other.endpoint.clone()],
        &security(Some(good_tls(&pki)?), Some(("pier", PIER_PW))),
    )
    .await?;
    ensure!(
        store.current_endpoint().ends_with(&first.endpoint),
        "{}",
        store.current_endpoint()
    );
    store.put("/pier/v1/f/a", b"1".to_vec(), None).await?;
    first.kill();
    store
        .put("/pier/v1/f/b", b"2".to_vec(), None)
        .await
        .context("put carries on past the dead member")?;
    ensure!(
        store.current_endpoint().ends_with(&other.endpoint),
        "{}",
        store.current_endpoint()
    );
    let out = other.etcdctl(
        Some(&format!("root:{ROOT_PW}")),
        &["get", "/pier/v1/f/b", "--print-value-only"],
    )?;
    ensure!(out.trim() == "2", "the other member has {out:?}");
    Ok(())
}

// ---- attacks ---------------------------------------------------------

/// A client with no certificate, to an etcd with `--client-cert-auth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_no_client_certificate_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let etcd = start(&pki, TlsEtcdOptions::default()).await?;
    let tls = EtcdTls::from_files(&pki.ca, None)?;
    let r = connect(&etcd, &security(Some(tls), None)).await;
    let m = refused(r, &["requires a client certificate", "sent none"])?;
    eprintln!("refused: {m}");
    assert_not_forged(&etcd, false)
}

/// A client whose certificate comes from another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_client_certificate_from_another_ca_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let other = new_pki()?;
    let etcd = start(&pki, TlsEtcdOptions::default()).await?;
    // Trusts etcd (the right CA) but presents the other CA's certificate.
    let tls = EtcdTls::from_files(&pki.ca, Some((&other.client_cert, &other.client_key)))?;
    let r = connect(&etcd, &security(Some(tls), None)).await;
    let m = refused(r, &["refused pier's client certificate"])?;
    eprintln!("refused: {m}");
    assert_not_forged(&etcd, false)
}

/// Plaintext HTTP/2 (gRPC) to the TLS port: pier's plain client, and the
/// real etcdctl over http://.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_plaintext_to_the_tls_port_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let etcd = start(&pki, TlsEtcdOptions::default()).await?;
    let r = connect(&etcd, &EtcdSecurity::default()).await;
    match &r {
        Err(e) => eprintln!("refused: {e}"),
        Ok(_) => bail!("a plaintext client connected to the TLS port"),
    }
    // Whatever it says, it must not write: try the forged put with a short
    // budget-bound client of its own.
    let plain = format!("http://{}", etcd.endpoint);
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &plain,
            "--command-timeout=3s",
            "--dial-timeout=2s",
        ])
        .args(["put", FORGED])
        .arg(String::from_utf8_lossy(FORGED_VALUE).as_ref())
        .output()?;
    ensure!(
        !out.status.success(),
        "etcdctl over plain http wrote: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_not_forged(&etcd, false)
}

/// Pier given another CA than the one that issued etcd's certificate (a
/// man in the middle, from pier's side): pier refuses etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_server_certificate_from_another_ca_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let other = new_pki()?;
    let etcd = start(&pki, TlsEtcdOptions::default()).await?;
    let tls = EtcdTls::from_files(&other.ca, Some((&pki.client_cert, &pki.client_key)))?;
    let r = connect(&etcd, &security(Some(tls), None)).await;
    let m = refused(r, &["server certificate is not trusted"])?;
    eprintln!("refused: {m}");
    Ok(())
}

/// Auth on: a client with a good certificate but no user or password
/// tries to forge the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_no_password_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let etcd = etcd_with_auth(&pki).await?;
    let r = connect(&etcd, &security(Some(good_tls(&pki)?), None)).await;
    let m = refused(r, &["user"])?;
    eprintln!("refused: {m}");
    assert_not_forged(&etcd, true)
}

/// Auth on: the right user, a wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_wrong_password_is_refused() -> Result<()> {
    let pki = new_pki()?;
    let etcd = etcd_with_auth(&pki).await?;
    let r = connect(
        &etcd,
        &security(Some(good_tls(&pki)?), Some(("pier", "not-the-password"))),
    )
    .await;
    let m = refused(r, &["\"pier\"", "password"])?;
    eprintln!("refused: {m}");
    assert_not_forged(&etcd, true)
}

// ---- bad files ---------------------------------------------------------

/// Each bad file is refused before anything connects, naming the file and
/// what is wrong with it.
#[test]
fn bad_tls_and_password_files_are_named() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let pki = new_pki()?;
    let other = new_pki()?;
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n")?;
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    let cases: Vec<(
        &str,
        Result<EtcdTls, pier_store::FileProblem>,
        &std::path::Path,
        &str,
    )> = vec![
        (
            "missing CA",
            EtcdTls::from_files(&missing, None),
            &missing,
            "does not exist",
        ),
        (
            "CA not PEM",
            EtcdTls::from_files(&not_pem, None),
            &not_pem,
            "no certificate",
        ),
        (
            "CA not X.509",
            EtcdTls::from_files(&garbage, None),
            &garbage,
            "not x.509",
        ),
        (
            "key is not a key",
            EtcdTls::from_files(&pki.ca, Some((&pki.client_cert, &pki.client_cert))),
            &pki.client_cert,
            "no private key",
        ),
        (
            "key of another certificate",
            EtcdTls::from_files(&pki.ca, Some((&pki.client_cert, &other.client_key))),
            &other.client_key,
            "is not the key of the certificate",
        ),
        (
            "missing client certificate",
            EtcdTls::from_files(&pki.ca, Some((&missing, &pki.client_key))),
            &missing,
            "does not exist",
        ),
    ];
    // A client certificate that expired yesterday.
    let expired = dir.path().join("expired.pem");
    let expired_key = dir.path().join("expired-key.pem");
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    pki.issue_valid(
        CLIENT_CN,
        &[],
        false,
        (now - 10 * day, now - day),
        &expired,
        &expired_key,
    )?;
    let mut cases = cases;
    cases.push((
        "expired client certificate",
        EtcdTls::from_files(&pki.ca, Some((&expired, &expired_key))),
        &expired,
        "expired at",
    ));
    for (what, r, path, says) in cases {
        match r {
            Err(p) => {
                let text = p.to_string();
                ensure!(
                    p.path == path,
                    "{what}: names {} not {}",
                    p.path.display(),
                    path.display()
                );
                ensure!(
                    text.to_lowercase().contains(says),
                    "{what}: {text:?} does not say {says:?}"
                );
            }
            Ok(t) => bail!("{what}: accepted {t:?}"),
        }
    }

    // The password file: 0644 is refused; 0600 is read, less its newline.
    let pw = dir.path().join("password");
    std::fs::write(&pw, "s3cret\n")?;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644))?;
    let e = EtcdUser::from_password_file("pier", &pw).expect_err("0644 accepted");
    ensure!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600))?;
    let u = EtcdUser::from_password_file("pier", &pw)?;
    ensure!(
        !format!("{u:?}").contains("s3cret"),
        "Debug shows the password: {u:?}"
    );
    std::fs::write(&pw, "")?;
    let e = EtcdUser::from_password_file("pier", &pw).expect_err("empty accepted");
    ensure!(e.to_string().contains("is empty"), "{e}");
    Ok(())
}

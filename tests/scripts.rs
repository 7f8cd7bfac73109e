//! The shell scripts' own logic, run for real:
//! - tests/cleanup.sh removes one run's containers, networks and network
//!   namespaces and leaves another run's alone (two runs at once must not
//!   break each other);
//! - scripts/deps.sh reports a package whose file or command is missing,
//!   and finds every check satisfied once tests/run.sh has installed them.
//!
//! Needs root and a running dockerd (tests/run.sh).

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use pier_tests::{TEST_IMAGE, ensure_test_image, run_id};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn sh(script: &str, args: &[&str]) -> Result<Output> {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .args(args)
        .current_dir(repo())
        .output()
        .context("running bash")
}

fn lines(cmd: &mut Command) -> Result<Vec<String>> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Containers (by name), networks (by name) and namespaces of one fake run.
struct Fixture {
    labels: Vec<String>,
}

impl Fixture {
    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.labels.iter().map(|l| format!("pier-cleanup-{l}"))
    }

    fn create(id: &str) -> Result<Fixture> {
        // The run's own id and one "RUN_ID-<slot>", as tests/lib.rs labels.
        let f = Fixture {
            labels: vec![id.to_owned(), format!("{id}-3")],
        };
        for (l, name) in f.labels.iter().zip(f.names()) {
            let label = format!("pier.test-run={l}");
            lines(Command::new("docker").args([
                "create",
                "--name",
                &name,
                "--label",
                &label,
                "--network",
                "none",
                TEST_IMAGE,
            ]))?;
            lines(Command::new("docker").args([
                "network",
                "create",
                "--internal",
                "--label",
                &label,
                &name,
            ]))?;
        }
        lines(Command::new("ip").args(["netns", "add", &format!("{id}-p17-sw")]))?;
        Ok(f)
    }

    /// Which of this fixture's containers, networks, namespaces exist.
    fn present(&self, id: &str) -> Result<(usize, usize, usize)> {
        let cs = lines(Command::new("docker").args(["ps", "-a", "--format", "{{.Names}}"]))?;
        let ns = lines(Command::new("docker").args(["network", "ls", "--format", "{{.Name}}"]))?;
        let nss = lines(Command::new("ip").args(["netns", "list"]))?;
        let c = self.names().filter(|n| cs.contains(n)).count();
        let n = self.names().filter(|n| ns.contains(n)).count();
        let s = nss
            .iter()
            .filter(|l| l.split_whitespace().next() == Some(&format!("{id}-p17-sw")))
            .count();
        Ok((c, n, s))
    }

    fn remove(&self, id: &str) {
        for n in self.names() {
            let _ = Command::new("docker").args(["rm", "-f", &n]).output();
            let _ = Command::new("docker").args(["network", "rm", &n]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{id}-p17-sw")])
            .output();
    }
}

/// Removes both fixtures whatever happens in the test.
struct Guard<'a>(Vec<(&'a Fixture, &'a str)>);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        for (f, id) in &self.0 {
            f.remove(id);
        }
    }
}

#[test]
fn cleanup_removes_its_own_run_only() -> Result<()> {
    ensure_test_image()?;
    // Two runs; the other's id starts with this one's text but is not it.
    let own = format!("{}cl", run_id().replace('-', "_"));
    let other = format!("{own}x");
    let a = Fixture::create(&own)?;
    let b = Fixture::create(&other)?;
    let _guard = Guard(vec![(&a, own.as_str()), (&b, other.as_str())]);
    ensure!(
        a.present(&own)? == (2, 2, 1),
        "fixture a: {:?}",
        a.present(&own)?
    );
    ensure!(
        b.present(&other)? == (2, 2, 1),
        "fixture b: {:?}",
        b.present(&other)?
    );

    let o = sh(". tests/cleanup.sh && pier_cleanup_run \"$1\"", &[&own])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ensure!(
        a.present(&own)? == (0, 0, 0),
        "own run left: {:?}",
        a.present(&own)?
    );
    ensure!(
        b.present(&other)? == (2, 2, 1),
        "the other run lost some: {:?} of (2, 2, 1)",
        b.present(&other)?
    );

    let o = sh(". tests/cleanup.sh && pier_cleanup_run \"$1\"", &[&other])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ensure!(b.present(&other)? == (0, 0, 0), "{:?}", b.present(&other)?);

    // A run id with a '-' (or nothing) is refused: prefixes would overlap.
    for bad in ["a-b", ""] {
        let o = sh(". tests/cleanup.sh && pier_cleanup_run \"$1\"", &[bad])?;
        ensure!(o.status.code() == Some(2), "{bad:?}: {o:?}");
        ensure!(
            String::from_utf8_lossy(&o.stderr).contains("bad run id"),
            "{o:?}"
        );
    }
    Ok(())
}

#[test]
fn deps_checks_name_what_is_missing() -> Result<()> {
    // A made-up table: the missing file and the missing command are named,
    // the present ones are not.
    let o = sh(
        ". scripts/deps.sh && printf '%s\\n' \
           'has-file /bin/sh' \
           'lacks-file /bin/sh /nonexistent/pier-deps-test.proto' \
           'has-cmd bash' \
           'lacks-cmd pier-no-such-command-here' | pier_missing",
        &[],
    )?;
    ensure!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        out.lines().collect::<Vec<_>>()
            == [
                "lacks-file /nonexistent/pier-deps-test.proto",
                "lacks-cmd pier-no-such-command-here"
            ],
        "{out:?}"
    );
    // After tests/run.sh's install step, nothing it checks is missing.
    let o = sh(
        ". scripts/deps.sh && { pier_build_deps; pier_run_deps; pier_test_deps; } | pier_missing",
        &[],
    )?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !out.trim().is_empty() {
        // docker compose v2 stands in for docker-compose (run.sh accepts it).
        let rest: Vec<&str> = out
            .lines()
            .filter(|l| !(l.starts_with("docker-compose ") && compose_v2()))
            .collect();
        if !rest.is_empty() {
            bail!("missing after install: {rest:?}");
        }
    }
    Ok(())
}

fn compose_v2() -> bool {
    Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

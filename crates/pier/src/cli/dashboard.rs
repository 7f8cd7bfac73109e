//! `pier dashboard`: a one-time login link to the agent's web dashboard
//! (`/ui/`), printed, and opened in a browser when one is available.
//!
//! The CLI asks the agent for a code with its API token; the link spends
//! the code for a session cookie and redirects to `/ui/`, so neither the
//! token nor the code stays in the browser's address bar.

use std::process::{Command, Stdio};

use anyhow::Result;

use super::args::client;

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Only print the link; do not start a browser.
    #[arg(long)]
    pub(super) no_browser: bool,
}

/// The browser command to run, if this session can show one: `$BROWSER`,
/// else `xdg-open` under a graphical session. Pure.
fn browser(env_browser: Option<&str>, graphical: bool, has_xdg_open: bool) -> Option<String> {
    match env_browser.map(str::trim) {
        Some(b) if !b.is_empty() => Some(b.to_owned()),
        _ if graphical && has_xdg_open => Some("xdg-open".to_owned()),
        _ => None,
    }
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

pub(super) async fn run(server: &str, a: DashboardArgs) -> Result<()> {
    let c = client(server)?;
    let login = c.dashboard_login().await?;
    let url = format!("{}{}", c.base_url().trim_end_matches('/'), login.path);
    outln!(
        "Open the dashboard (the link works once, within {} s):\n  {url}",
        login.expires_in_ms / 1000
    );
    if a.no_browser {
        return Ok(());
    }
    let graphical =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let env_browser = std::env::var("BROWSER").ok();
    let Some(cmd) = browser(env_browser.as_deref(), graphical, on_path("xdg-open")) else {
        outln!(
            "(no browser found here: open the link on this host, or through an SSH tunnel to the agent's API port)"
        );
        return Ok(());
    };
    // The opener returns at once (it hands the URL to the browser); its
    // outcome is only reported.
    match Command::new(&cmd)
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(st) if st.success() => outln!("(opened with {cmd})"),
        Ok(st) => outln!("({cmd} exited with {st}; open the link yourself)"),
        Err(e) => outln!("(could not run {cmd}: {e}; open the link yourself)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_browser() {
        assert_eq!(
            browser(Some("firefox"), false, false).as_deref(),
            Some("firefox")
        );
        assert_eq!(browser(Some(" "), true, true).as_deref(), Some("xdg-open"));
        assert_eq!(browser(None, true, true).as_deref(), Some("xdg-open"));
        assert_eq!(browser(None, true, false), None);
        assert_eq!(browser(None, false, true), None, "no display, no browser");
    }
}

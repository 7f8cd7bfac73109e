//! `pier version`: the client's and the agent's versions.

use anyhow::Result;

use super::args::client;

pub(super) async fn run(server: &str) -> Result<()> {
    outln!("client: pier {}", crate::VERSION);
    let c = client(server)?;
    let v = c.version().await?;
    outln!(
        "agent:  pier {} on node {} (store revision {})",
        v.version,
        v.node,
        v.revision
    );
    Ok(())
}

//! `meshgate bench`: an MQTT load generator that measures a front end (placeholder until it lands).

/// Options of `meshgate bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn main(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("meshgate bench is not built yet")
}

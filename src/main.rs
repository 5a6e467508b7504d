//! The meshgate binary: everything lives in the libraries; this only hands over to the CLI.
mod cli;
mod notify;
fn main() -> std::process::ExitCode {
    cli::main()
}

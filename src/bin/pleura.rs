//! `pleura`: parses arguments and hands over to [`pleura::cli::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pleura::cli::Cli::parse();
    // Quiet by default: the CLI's output is its tables, not logs.
    pleura::telemetry::init_tracing(pleura::config::LogFormat::Human, "warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(pleura::cli::run(cli))
}

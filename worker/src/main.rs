//! `pleura-worker`: parses arguments, sets up logging, and hands over to
//! [`pleura_worker::run`]. Everything that matters lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Pleura fleet worker: scans from RabbitMQ, verdicts to Redis.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `PLEURA_CONFIG` also works. `PLEURA_*`
    /// environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve this local model directory (`model.onnx` + `model.json`).
    #[arg(long)]
    model: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut settings = match pleura::config::Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pleura-worker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(model) = args.model {
        settings.model_dir = Some(model);
    }
    pleura::telemetry::init_tracing(settings.log_format, &settings.log_level);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The executor only shuffles bytes; CPU work has its own pool.
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(pleura_worker::run(
        settings,
        pleura_worker::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}

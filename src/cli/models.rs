//! `pleura models ...`: the ML engineer's side of the registry.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{announcer, failed, open_registry, CliError};
use crate::config::Settings;
use crate::model::ResNetSpec;
use crate::registry::{self, signing, PublishRequest, Published};
use crate::wire::GateOutcome;

/// `pleura models ...`
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Write a deterministic, untrained model for bring-up and tests.
    Init {
        /// Output directory (gets model.onnx and model.json).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Width of the first stage (64 is the seed's ResNet-18).
        #[arg(long, default_value_t = 64)]
        width: i64,
        /// Side of the square input image.
        #[arg(long, default_value_t = 256)]
        image_size: u32,
    },
    /// Make an ed25519 key pair for signing models: DIR/NAME.key (private,
    /// mode 0600; give it to publishers) and DIR/NAME.pub (give it to workers
    /// as a trusted key).
    Keygen {
        /// Directory to write the key pair into.
        #[arg(long)]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "pleura")]
        name: String,
    },
    /// Publish a model directory: promotion gate, sign, upload, record,
    /// activate and announce.
    Publish {
        /// Directory with model.onnx and model.json (the trainer's output).
        dir: PathBuf,
        /// Signing key; defaults to `signing_key_file` from the config.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Publish even if the promotion gate fails (requires --reason).
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why; recorded in the activation history.
        #[arg(long)]
        reason: Option<String>,
        /// Publish only; activate later with `pleura models activate`.
        #[arg(long)]
        no_activate: bool,
    },
    /// List published versions, the active one marked with `*`.
    List {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one version: manifest, metrics, publication, refusals.
    Show {
        /// The version.
        version: String,
    },
    /// Make a version active (promote, or roll back) and tell the fleet.
    Activate {
        /// The version.
        version: String,
        /// Why; recorded in the activation history.
        #[arg(long, default_value = "activated by hand")]
        reason: String,
    },
    /// Recent activations, newest first.
    History {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Check a version's hash and signature offline, as a worker would.
    Verify {
        /// The version.
        version: String,
        /// Trusted public key (hex or .pub path); repeatable. Defaults to
        /// `trusted_keys` from the config.
        #[arg(long = "key")]
        keys: Vec<String>,
    },
}

pub(super) async fn run(settings: &Settings, cmd: ModelsCommand) -> Result<ExitCode, CliError> {
    match cmd {
        ModelsCommand::Init {
            out,
            seed,
            width,
            image_size,
        } => init(&out, seed, width, image_size),
        ModelsCommand::Keygen { out, name } => keygen(&out, &name),
        ModelsCommand::Publish {
            dir,
            key,
            force,
            reason,
            no_activate,
        } => {
            let request = PublishRequest {
                dir,
                key_file: key.or_else(|| settings.signing_key_file.clone()),
                force,
                reason,
                activate: !no_activate,
                by: registry::who(),
            };
            let registry = open_registry(settings).await?;
            let publication = registry::publish(
                &registry,
                &announcer(settings)?,
                &settings.gate_policy(),
                &request,
            )
            .await
            .map_err(failed)?;
            print_published(&publication.published);
            warn_about(settings, &publication.warnings());
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::List { json } => list(settings, json).await,
        ModelsCommand::Show { version } => show(settings, &version).await,
        ModelsCommand::Activate { version, reason } => {
            let registry = open_registry(settings).await?;
            let promotion = registry::activate(
                &registry,
                &announcer(settings)?,
                &version,
                &reason,
                &registry::who(),
            )
            .await
            .map_err(failed)?;
            let a = &promotion.activation;
            println!(
                "{} is active (was {})",
                a.version,
                a.previous.as_deref().unwrap_or("none")
            );
            warn_about(settings, &promotion.warnings());
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::History { limit } => {
            let registry = open_registry(settings).await?;
            for a in registry.history(limit).await.map_err(failed)? {
                println!(
                    "{}  {} -> {}  by {}: {}",
                    a.at,
                    a.previous.as_deref().unwrap_or("none"),
                    a.version,
                    a.by,
                    a.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Verify { version, keys } => verify(settings, &version, &keys).await,
    }
}

fn init(out: &Path, seed: u64, width: i64, image_size: u32) -> Result<ExitCode, CliError> {
    if width < 1 || image_size < 32 {
        return Err(CliError::Usage(
            "--width must be >= 1 and --image-size >= 32".into(),
        ));
    }
    let spec = ResNetSpec {
        image_size,
        ..ResNetSpec::with_width(width)
    };
    let files = crate::model::init_model(&spec, seed).map_err(failed)?;
    files.write_dir(out).map_err(failed)?;
    println!(
        "wrote untrained model {} to {}",
        files.manifest.version,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn keygen(out: &Path, name: &str) -> Result<ExitCode, CliError> {
    let key = signing::generate();
    let (private, public) = signing::write_keypair(&key, out, name).map_err(failed)?;
    println!(
        "key id {}\nprivate key: {} (keep it secret: publishers only)\npublic key:  {} (add to workers' trusted_keys)",
        signing::key_id(&key.verifying_key()),
        private.display(),
        public.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the library's warnings, with how soon workers heal by themselves.
fn warn_about(settings: &Settings, warnings: &[String]) {
    for w in warnings {
        eprintln!("pleura: warning: {w}");
    }
    if warnings.iter().any(|w| w.contains("announce")) {
        eprintln!(
            "pleura: workers switch within reconcile_interval_secs ({} s) anyway",
            settings.reconcile_interval_secs
        );
    }
}

fn print_published(p: &Published) {
    let e = &p.entry;
    println!("published {} to {}", e.version, e.artifact_url);
    match &e.key_id {
        Some(k) => println!("  signed by key {k}"),
        None => println!("  UNSIGNED"),
    }
    match &e.gate {
        GateOutcome::Passed => println!("  promotion gate: passed"),
        GateOutcome::Forced { failures, reason } => {
            println!("  promotion gate: FORCED ({reason})");
            for f in failures {
                println!("    - {f}");
            }
        }
    }
    if let Some(a) = &p.activation {
        println!(
            "  active now (was {})",
            a.previous.as_deref().unwrap_or("none")
        );
    }
}

fn fmt_metric(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

async fn list(settings: &Settings, json: bool) -> Result<ExitCode, CliError> {
    let registry = open_registry(settings).await?;
    let entries = registry.entries().await.map_err(failed)?;
    let active = registry.active().await.map_err(failed)?;
    let mut out = std::io::stdout().lock();
    if json {
        for e in &entries {
            let mut v = serde_json::to_value(e).expect("entries serialise");
            v["active"] = serde_json::Value::Bool(active.as_deref() == Some(e.version.as_str()));
            let _ = writeln!(out, "{v}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let vw = entries
        .iter()
        .map(|e| e.version.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let _ = writeln!(
        out,
        "  {:<vw$}  {:>6}  {:>6}  {:>9}  {:<16}  {:<6}  {:<20}  {:<20}",
        "version", "auroc", "recall", "threshold", "signed by", "gate", "created", "published"
    );
    for e in &entries {
        let m = &e.manifest;
        let mark = if active.as_deref() == Some(e.version.as_str()) {
            "*"
        } else {
            " "
        };
        let gate = match e.gate {
            GateOutcome::Passed => "passed",
            GateOutcome::Forced { .. } => "forced",
        };
        let _ = writeln!(
            out,
            "{mark} {:<vw$}  {:>6}  {:>6}  {:>9.4}  {:<16}  {gate:<6}  {:<20}  {:<20}",
            e.version,
            fmt_metric(registry::manifest_auroc(m)),
            fmt_metric(registry::manifest_recall(m)),
            m.threshold,
            e.key_id.as_deref().unwrap_or("UNSIGNED"),
            m.created_at,
            e.published_at,
        );
    }
    if entries.is_empty() {
        let _ = writeln!(out, "(no published versions)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(settings: &Settings, version: &str) -> Result<ExitCode, CliError> {
    let registry = open_registry(settings).await?;
    let entry = registry
        .entry(version)
        .await
        .map_err(failed)?
        .ok_or_else(|| CliError::Failed(format!("version {version} is not published")))?;
    let active = registry.active().await.map_err(failed)?;
    let refusals = registry.refusals(version).await.map_err(failed)?;
    let doc = serde_json::json!({
        "entry": entry,
        "active": active.as_deref() == Some(version),
        "refused_by": refusals,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).expect("documents serialise")
    );
    Ok(ExitCode::SUCCESS)
}

async fn verify(settings: &Settings, version: &str, keys: &[String]) -> Result<ExitCode, CliError> {
    let trust = if keys.is_empty() {
        settings
            .trust()
            .map_err(|e| CliError::Usage(e.to_string()))?
    } else {
        signing::Trust::from_specs(keys, settings.allow_unsigned_models)
            .map_err(|e| CliError::Usage(e.to_string()))?
    };
    let store = registry::ArtifactStore::open(&settings.registry_url).map_err(failed)?;
    let artifact = store.download(version).await.map_err(failed)?;
    match artifact.verify(&trust) {
        Ok(v) => {
            println!(
                "{version}: ok (sha256 {}, {})",
                v.files.manifest.sha256,
                match &v.key_id {
                    Some(k) => format!("signed by trusted key {k}"),
                    None => "unsigned, allowed by allow_unsigned_models".into(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(CliError::Failed(format!(
            "{version}: REFUSED ({}): {e}",
            e.code()
        ))),
    }
}

//! What the CLI prints: one row per scan as a table or JSON lines, progress
//! bars on a terminal, and the exit code the rows imply.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::wire::{Classification, ScanResult};

pub(super) fn progress(len: usize, what: &'static str) -> ProgressBar {
    // A bar is noise for a handful of files and garbage in a pipe or a log.
    if len < 8 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what);
    bar
}

/// One row of output: a file and what became of it.
#[derive(Debug, Default, Serialize)]
pub(super) struct Row {
    pub(super) file: String,
    pub(super) job_id: String,
    pub(super) status: String,
    pub(super) label: Option<String>,
    pub(super) p_effusion: Option<f32>,
    pub(super) threshold: Option<f32>,
    pub(super) model_version: Option<String>,
    pub(super) ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

impl Row {
    fn is_ok(&self) -> bool {
        self.status == "ok"
    }

    /// A scan classified in this process (`pleura classify`): no job id.
    pub(super) fn classified(file: String, c: &Classification) -> Row {
        Row {
            file,
            job_id: "-".into(),
            status: "ok".into(),
            label: Some(c.label.as_str().into()),
            p_effusion: Some(c.p_effusion),
            threshold: Some(c.threshold),
            model_version: Some(c.model_version.clone()),
            ms: None,
            error: None,
        }
    }

    pub(super) fn from_result(file: String, r: &ScanResult) -> Row {
        Row {
            file,
            job_id: r.job_id.clone(),
            status: if r.is_ok() {
                "ok".into()
            } else {
                "error".into()
            },
            label: r.label.map(|l| l.as_str().to_string()),
            p_effusion: r.p_effusion,
            threshold: r.threshold,
            model_version: r.model_version.clone(),
            ms: Some(r.timings_ms.total),
            error: r
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.message)),
        }
    }
}

pub(super) fn print_rows(rows: &[Row], json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        for r in rows {
            let _ = writeln!(out, "{}", serde_json::to_string(r).expect("rows serialise"));
        }
        return;
    }
    let fw = rows
        .iter()
        .map(|r| r.file.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    let _ = writeln!(
        out,
        "{:<fw$}  {:<36}  {:<10}  {:>10}  {:<24}  {:>8}",
        "file", "job id", "label", "p_effusion", "model", "ms"
    );
    for r in rows {
        let file = if r.file.len() > fw {
            format!("…{}", &r.file[r.file.len() - fw + 1..])
        } else {
            r.file.clone()
        };
        let label = match (&r.label, &r.error) {
            (Some(l), _) => l.clone(),
            (None, Some(e)) => format!("ERROR {}", e.split(':').next().unwrap_or("")),
            (None, None) => r.status.clone(),
        };
        let p = r
            .p_effusion
            .map(|p| format!("{p:.4}"))
            .unwrap_or_else(|| "-".into());
        let ms =
            r.ms.map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into());
        let model = r.model_version.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{file:<fw$}  {:<36}  {label:<10}  {p:>10}  {model:<24}  {ms:>8}",
            r.job_id
        );
    }
    let ok = rows.iter().filter(|r| r.is_ok()).count();
    let submitted = rows.iter().filter(|r| r.status == "submitted").count();
    if submitted == rows.len() {
        // Without --wait nothing has an outcome yet.
        let _ = writeln!(out, "{submitted} submitted");
    } else {
        let _ = writeln!(out, "{ok} ok, {} failed", rows.len() - ok);
    }
}

pub(super) fn exit_for(rows: &[Row]) -> ExitCode {
    if rows.iter().all(Row::is_ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

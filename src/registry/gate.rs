//! The promotion gate: what a candidate must show before it serves.

use crate::model::Manifest;

/// The promotion gate's rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatePolicy {
    /// Lowest validation AUROC a candidate may have.
    pub min_auroc: f64,
    /// Lowest validation recall at the candidate's own threshold.
    pub min_recall: f64,
}

/// A model's validation AUROC, from the trainer's metrics.
pub fn manifest_auroc(m: &Manifest) -> Option<f64> {
    m.metrics.as_ref()?.get("auroc")?.as_f64()
}

/// A model's validation recall at its own threshold.
pub fn manifest_recall(m: &Manifest) -> Option<f64> {
    let metrics = m.metrics.as_ref()?;
    metrics
        .get("at_chosen")
        .and_then(|s| s.get("recall"))
        .or_else(|| metrics.get("chosen").and_then(|s| s.get("recall")))?
        .as_f64()
}

/// The fingerprint of the validation set a model was measured on.
pub fn manifest_fingerprint(m: &Manifest) -> Option<&str> {
    m.training
        .as_ref()?
        .get("data")?
        .get("fingerprint")?
        .as_str()
}

/// Checks a candidate against the gate and, when both were measured on the
/// same validation set, against the active model. Returns the failed rules;
/// empty means it passes.
pub fn gate(candidate: &Manifest, active: Option<&Manifest>, policy: &GatePolicy) -> Vec<String> {
    let mut failures = Vec::new();
    if !candidate.trained {
        failures.push("the model is untrained".to_string());
    }
    match manifest_auroc(candidate) {
        Some(a) if a >= policy.min_auroc => {}
        Some(a) => failures.push(format!(
            "validation AUROC {a:.3} is below {:.3}",
            policy.min_auroc
        )),
        None => failures.push("the manifest has no validation AUROC".into()),
    }
    match manifest_recall(candidate) {
        Some(r) if r >= policy.min_recall => {}
        Some(r) => failures.push(format!(
            "validation recall {r:.3} at the model's threshold is below {:.3}",
            policy.min_recall
        )),
        None => failures.push("the manifest has no validation recall".into()),
    }
    if let Some(active) = active {
        let same_set = manifest_fingerprint(candidate)
            .is_some_and(|f| Some(f) == manifest_fingerprint(active));
        if same_set {
            let pairs = [
                ("AUROC", manifest_auroc(candidate), manifest_auroc(active)),
                (
                    "recall",
                    manifest_recall(candidate),
                    manifest_recall(active),
                ),
            ];
            for (what, new, old) in pairs {
                if let (Some(new), Some(old)) = (new, old) {
                    if new < old {
                        failures.push(format!(
                            "{what} {new:.3} regresses from the active {} ({old:.3}) on the same validation set",
                            active.version
                        ));
                    }
                }
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, ModelFiles, ResNetSpec};

    fn tiny(seed: u64) -> ModelFiles {
        init_model(&ResNetSpec::tiny(), seed).unwrap()
    }

    fn trained(mut files: ModelFiles, auroc: f64, recall: f64, fingerprint: &str) -> ModelFiles {
        files.manifest.trained = true;
        files.manifest.metrics = Some(serde_json::json!({
            "auroc": auroc, "at_chosen": {"recall": recall}
        }));
        files.manifest.training = Some(serde_json::json!({"data": {"fingerprint": fingerprint}}));
        files
    }

    const POLICY: GatePolicy = GatePolicy {
        min_auroc: 0.8,
        min_recall: 0.85,
    };

    #[test]
    fn the_gate_refuses_untrained_weak_and_regressing_models() {
        let untrained = tiny(1).manifest;
        assert_eq!(gate(&untrained, None, &POLICY).len(), 3);
        let good = trained(tiny(1), 0.93, 0.9, "A").manifest;
        assert!(gate(&good, None, &POLICY).is_empty());
        let weak = trained(tiny(2), 0.7, 0.8, "A").manifest;
        assert_eq!(gate(&weak, None, &POLICY).len(), 2);
        // Same validation set: must not regress. Another set: not comparable.
        let slightly_worse = trained(tiny(3), 0.91, 0.9, "A").manifest;
        let failures = gate(&slightly_worse, Some(&good), &POLICY);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("regresses"));
        let other_set = trained(tiny(3), 0.91, 0.9, "B").manifest;
        assert!(gate(&other_set, Some(&good), &POLICY).is_empty());
    }
}

//! The promotion gate: what a candidate must show before it serves.

use crate::model::{Manifest, Precision};

/// The promotion gate's rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatePolicy {
    /// Lowest validation AUROC a candidate may have.
    pub min_auroc: f64,
    /// Lowest validation recall at the candidate's own threshold.
    pub min_recall: f64,
    /// Largest validation AUROC an int8 variant may lose against its fp32
    /// parent, both measured on the parent's validation set.
    pub max_int8_auroc_loss: f64,
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

/// What the trainer measured of an int8 variant's fp32 parent, in the same
/// run and on the same validation images as the variant: `metrics.parent`.
fn parent_metrics(m: &Manifest) -> Option<(Option<&str>, Option<f64>, Option<f64>)> {
    let p = m.metrics.as_ref()?.get("parent")?;
    Some((
        p.get("version").and_then(|v| v.as_str()),
        p.get("auroc").and_then(|v| v.as_f64()),
        p.get("at_chosen")
            .and_then(|s| s.get("recall"))
            .and_then(|v| v.as_f64()),
    ))
}

/// The int8 rules: a variant is as good as its parent on the parent's own
/// validation set, or it does not serve. Quantisation is meant to change
/// speed, not verdicts, so recall at the (unchanged) threshold must be
/// exactly the parent's and AUROC may move only by rounding noise.
fn int8_failures(candidate: &Manifest, policy: &GatePolicy) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(derivation) = &candidate.derived_from else {
        failures.push("an int8 model must name the fp32 model it was derived from".into());
        return failures;
    };
    let Some((version, parent_auroc, parent_recall)) = parent_metrics(candidate) else {
        failures.push(format!(
            "the manifest has no validation metrics of its fp32 parent {}",
            derivation.parent
        ));
        return failures;
    };
    if version != Some(derivation.parent.as_str()) {
        failures.push(format!(
            "the parent metrics are of {}, not of the parent {}",
            version.unwrap_or("an unnamed model"),
            derivation.parent
        ));
    }
    match (manifest_auroc(candidate), parent_auroc) {
        (Some(a), Some(p)) if p - a <= policy.max_int8_auroc_loss + 1e-12 => {}
        (Some(a), Some(p)) => failures.push(format!(
            "int8 validation AUROC {a:.4} loses {:.4} against its fp32 parent's {p:.4} (at most {:.4} allowed)",
            p - a,
            policy.max_int8_auroc_loss
        )),
        _ => failures.push("the int8 model or its parent has no validation AUROC".into()),
    }
    match (manifest_recall(candidate), parent_recall) {
        (Some(r), Some(p)) if (r - p).abs() < 1e-9 => {}
        (Some(r), Some(p)) => failures.push(format!(
            "int8 validation recall {r:.3} at the threshold differs from its fp32 parent's {p:.3}"
        )),
        _ => failures.push("the int8 model or its parent has no validation recall".into()),
    }
    failures
}

/// Checks a candidate against the gate and, when both were measured on the
/// same validation set, against the active model. An int8 variant is also
/// checked against its fp32 parent. Returns the failed rules; empty means it
/// passes.
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
    if candidate.precision == Precision::Int8 {
        failures.extend(int8_failures(candidate, policy));
    }
    // An int8 variant replacing its own parent was just held to the int8
    // rules, which allow rounding noise; the strict no-regression rule would
    // refuse every variant that is not bit-identical in ranking.
    let replaces_parent = active.is_some_and(|a| {
        candidate
            .derived_from
            .as_ref()
            .is_some_and(|d| d.parent == a.version)
    });
    if let Some(active) = active.filter(|_| !replaces_parent) {
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
        max_int8_auroc_loss: 0.005,
    };

    /// An int8 variant of `parent` with its own and its parent's metrics.
    fn int8_of(parent: &Manifest, auroc: f64, recall: f64) -> Manifest {
        let mut m = trained(tiny(9), auroc, recall, "A").manifest;
        m.version = format!("{}-int8", parent.version);
        m.precision = Precision::Int8;
        m.derived_from = Some(crate::model::Derivation {
            parent: parent.version.clone(),
            calibration_images: 64,
            calibration_fingerprint: "f".repeat(64),
        });
        let metrics = m.metrics.as_mut().unwrap();
        metrics["parent"] = serde_json::json!({
            "version": parent.version,
            "auroc": manifest_auroc(parent),
            "at_chosen": {"recall": manifest_recall(parent)},
        });
        m
    }

    #[test]
    fn an_int8_variant_must_match_its_parent() {
        let parent = trained(tiny(1), 0.93, 0.9, "A").manifest;
        // Rounding noise in the ranking passes, even against the parent
        // itself as the active model.
        let close = int8_of(&parent, 0.927, 0.9);
        assert!(gate(&close, Some(&parent), &POLICY).is_empty());
        assert!(gate(&close, None, &POLICY).is_empty());
        // More than 0.005 AUROC lost: refused, though it clears the floor.
        let lossy = int8_of(&parent, 0.92, 0.9);
        let failures = gate(&lossy, Some(&parent), &POLICY);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("loses 0.0100"), "{failures:?}");
        // Recall at the threshold must not move, up or down.
        let moved = int8_of(&parent, 0.93, 0.95);
        let failures = gate(&moved, None, &POLICY);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("differs"), "{failures:?}");
        // Without its parent's metrics an int8 model cannot be judged.
        let mut bare = int8_of(&parent, 0.93, 0.9);
        bare.metrics
            .as_mut()
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove("parent");
        assert!(gate(&bare, None, &POLICY)[0].contains("fp32 parent"));
        // Metrics of another model do not count.
        let mut other = int8_of(&parent, 0.93, 0.9);
        other.metrics.as_mut().unwrap()["parent"]["version"] = "someone-else".into();
        assert!(gate(&other, None, &POLICY)[0].contains("someone-else"));
    }

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

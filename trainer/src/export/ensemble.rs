//! Export of an ensemble: several trained networks of one shape (the fold
//! models of a cross-validation, say) become one ONNX graph that averages
//! their probabilities, optionally over the mirrored image too, with logits
//! divided by a fitted temperature.
//!
//! Why one graph and not K models: the fleet serves one model per version;
//! the registry, the gate, the canary, the reload path and the engine then
//! need no notion of ensembles, and what was checked (parity, golden cases)
//! is what runs. The cost is per scan: each member is a full forward pass,
//! twice with the flip.
//!
//! The check is the single model's: the bytes from the shared writer run in
//! tract through the fleet's own plan and must agree within
//! [`super::PARITY_TOLERANCE`] with the same average computed in tch
//! ([`tch_ensemble_probabilities`]): `mean over members m and views v of
//! softmax(m(v(x)) / T)`, the views being the image and, with the flip, the
//! image reversed along its width.

use std::path::Path;

use pleura::model::manifest::CalibrationRecord;
use pleura::model::onnx::{ResNetSpec, Weights};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::{check_inputs, check_version, write_model, ExportError, Exported, Job, TCH_CHUNK};
use crate::model::{self, ResNet};

/// What to export as one ensemble graph.
pub struct EnsembleExportRequest<'a> {
    /// The shape of every member: a plain spec (one member, no flip,
    /// temperature 1), the one each member was trained from.
    pub spec: &'a ResNetSpec,
    /// The members' variables, in order (member `i`'s weights become
    /// `m{i}.*` in the graph; one member keeps its plain names). Each must
    /// hold exactly `spec`'s parameters; they may live on any device.
    pub members: &'a [&'a nn::VarStore],
    /// Also run every member on the image mirrored left to right.
    pub tta_flip: bool,
    /// Temperature `T` the graph divides every logit by; 1 for none.
    pub temperature: f32,
    /// How `T` was fitted, recorded in the manifest; its `temperature` must
    /// equal [`EnsembleExportRequest::temperature`].
    pub calibration: Option<CalibrationRecord>,
    /// Decision threshold on the ensemble's `p_effusion`; strictly in (0, 1).
    pub threshold: f32,
    /// Metrics of the ensemble, stored as `manifest.metrics` (`null` stores nothing).
    pub metrics: serde_json::Value,
    /// Training summary, stored as `manifest.training` (`null` stores nothing).
    pub training: serde_json::Value,
    /// Preprocessed images for the parity check; at least one.
    pub parity_inputs: &'a [Vec<f32>],
    /// Version, `[A-Za-z0-9._-]{1,64}`; `None` generates one as [`super::export`] does.
    pub version: Option<String>,
}

impl EnsembleExportRequest<'_> {
    /// The spec of the graph this request writes: [`EnsembleExportRequest::spec`]
    /// with the members, the flip and the temperature.
    pub fn graph_spec(&self) -> Result<ResNetSpec, ExportError> {
        if !self.spec.is_plain() {
            return Err(ExportError::Invalid(format!(
                "the ensemble's spec must be its members' plain spec, got {:?}",
                self.spec
            )));
        }
        if self.members.is_empty() {
            return Err(ExportError::Invalid("an ensemble needs a member".into()));
        }
        let spec = ResNetSpec {
            members: u32::try_from(self.members.len()).unwrap_or(u32::MAX),
            tta_flip: self.tta_flip,
            temperature: self.temperature,
            ..self.spec.clone()
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Exports `req.members` as one graph in `out/<version>/`, the way
/// [`super::export`] exports one network: the weights are read out of each
/// store (and must be exactly the spec's), written under their member
/// prefixes by the shared writer, checked in tract against
/// [`tch_ensemble_probabilities`] on `req.parity_inputs`, given golden cases
/// from tract, and only then written. The manifest's `spec` says what the
/// graph is (`members`, `tta_flip`, `temperature`) and its `calibration`
/// is `req.calibration`.
///
/// A single member with no flip and temperature 1 writes the same bytes as
/// [`super::export`] of that network.
pub fn export_ensemble(req: &EnsembleExportRequest, out: &Path) -> Result<Exported, ExportError> {
    export_ensemble_with(req, out, |_| {})
}

/// [`export_ensemble`] with a hook on the graph's weights before writing,
/// so tests can corrupt one member and watch the parity check refuse it.
fn export_ensemble_with(
    req: &EnsembleExportRequest,
    out: &Path,
    tamper: impl FnOnce(&mut Weights),
) -> Result<Exported, ExportError> {
    let spec = req.graph_spec()?;
    if let Some(c) = &req.calibration {
        if c.temperature != req.temperature {
            return Err(ExportError::Invalid(format!(
                "the calibration record's temperature {} is not the graph's {}",
                c.temperature, req.temperature
            )));
        }
    }
    if let Some(v) = &req.version {
        check_version(v)?;
    }
    check_inputs(&spec, req.parity_inputs)?;

    let member_spec = spec.member();
    // Each member rebuilt in a store of its own from the caller's variables,
    // all on the first member's device, so the callers' stores and modules
    // stay untouched; these copies are what is written and checked.
    let device = req.members[0].device();
    let mut stores = Vec::with_capacity(req.members.len());
    let mut nets = Vec::with_capacity(req.members.len());
    for member in req.members {
        let mut vs = nn::VarStore::new(device);
        nets.push(ResNet::try_new(&vs.root(), &member_spec)?);
        vs.copy(member)?;
        stores.push(vs);
    }
    // Platt's bias b is applied where the graph already has an addition:
    // the effusion logit's final-layer bias, raised by b * T, so that
    // softmax(logits / T) gives sigmoid(margin / T + b) for every member
    // and view.
    if let Some(b) = req.calibration.as_ref().and_then(|c| c.bias) {
        let shift = f64::from(b) * f64::from(req.temperature);
        for vs in &stores {
            let bias = vs
                .variables()
                .get("fc.bias")
                .map(Tensor::shallow_clone)
                .ok_or_else(|| {
                    ExportError::Invalid("a member without fc.bias cannot take Platt's bias".into())
                })?;
            tch::no_grad(|| -> Result<(), tch::TchError> {
                let mut effusion = bias.f_narrow(0, crate::data::CLASS_EFFUSION, 1)?;
                let _ = effusion.f_add_scalar_(shift)?;
                Ok(())
            })?;
        }
    }
    let mut weights = Weights::from_members(
        stores
            .iter()
            .map(|vs| model::to_weights(vs, &member_spec))
            .collect::<Result<_, _>>()?,
    );
    tamper(&mut weights);
    let nets: Vec<&ResNet> = nets.iter().collect();
    let job = Job {
        spec: &spec,
        threshold: req.threshold,
        metrics: &req.metrics,
        training: &req.training,
        parity_inputs: req.parity_inputs,
        version: &req.version,
        calibration: req.calibration.clone(),
    };
    write_model(
        &job,
        &weights,
        |inputs| tch_ensemble_probabilities(&nets, device, &spec, inputs),
        out,
    )
}

/// What the ensemble graph of `spec` computes, in tch (eval mode) on
/// `device`: for each input, the mean over `nets` (one per member, in
/// order) and over the image and, with `spec.tta_flip`, its mirror image,
/// of `softmax(logits / spec.temperature)`. Row-major `[inputs, classes]`.
pub fn tch_ensemble_probabilities(
    nets: &[&ResNet],
    device: Device,
    spec: &ResNetSpec,
    inputs: &[Vec<f32>],
) -> Result<Vec<f32>, ExportError> {
    if nets.len() != spec.members as usize {
        return Err(ExportError::Invalid(format!(
            "{} networks for a spec of {} members",
            nets.len(),
            spec.members
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let (c, s) = (spec.in_channels, spec.image_size as i64);
    let mut out = Vec::with_capacity(inputs.len() * spec.num_classes as usize);
    for chunk in inputs.chunks(TCH_CHUNK) {
        let flat: Vec<f32> = chunk.concat();
        let n = chunk.len() as i64;
        let x = Tensor::f_from_slice(&flat)?
            .f_view([n, c, s, s])?
            .f_to_device(device)?;
        let mut views = vec![x.shallow_clone()];
        if spec.tta_flip {
            // NCHW: dimension 3 is the width, so this mirrors left to right.
            views.push(x.f_flip([3])?);
        }
        let mut sum: Option<Tensor> = None;
        for net in nets {
            for view in &views {
                let mut logits = net.forward_t(view, false);
                if spec.temperature != 1.0 {
                    logits = logits.f_div_scalar(f64::from(spec.temperature))?;
                }
                let probs = logits.f_softmax(-1, Kind::Float)?;
                if probs.size() != [n, spec.num_classes] {
                    return Err(ExportError::Invalid(format!(
                        "tch model output has shape {:?}, expected [{n}, {}]: model and spec disagree",
                        probs.size(),
                        spec.num_classes
                    )));
                }
                sum = Some(match sum {
                    None => probs,
                    Some(acc) => acc.f_add(&probs)?,
                });
            }
        }
        let mean = sum
            .expect("at least one member and one view")
            .f_div_scalar(spec.branches() as f64)?;
        out.extend(model::to_f32_vec(&mean)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{export, ExportRequest, GOLDEN_SEEDS, PARITY_TOLERANCE};
    use super::*;
    use pleura::model::manifest::{golden_input, CalibrationMethod, ModelFiles};
    use pleura::model::Engine;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SIZE: u32 = 32;

    fn spec() -> ResNetSpec {
        ResNetSpec {
            image_size: SIZE,
            ..ResNetSpec::tiny()
        }
    }

    /// Noise plus smooth images, as the single export's tests use.
    fn parity_inputs() -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut v: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..SIZE * SIZE).map(|_| rng.random::<f32>()).collect())
            .collect();
        v.extend([11, 12, 13].map(|s| golden_input(s, SIZE)));
        v
    }

    /// A randomly initialised member whose fc weight is 20 times torch's
    /// default, so its logits are far enough apart that a missing flip or
    /// temperature moves probabilities well past the tolerance.
    fn member(seed: i64) -> (nn::VarStore, ResNet) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(&vs.root(), &spec());
        tch::no_grad(|| {
            let _scaled = vs.variables()["fc.weight"]
                .shallow_clone()
                .f_mul_scalar_(20.0)
                .unwrap();
        });
        (vs, net)
    }

    fn calibration(t: f32) -> CalibrationRecord {
        CalibrationRecord {
            method: CalibrationMethod::Temperature,
            temperature: t,
            fitted_on: "out-of-fold predictions, 3 folds, 96 images".into(),
            ece_before: 0.12,
            ece_after: 0.03,
            ece_bins: Some(10),
            bias: None,
        }
    }

    fn request<'a>(
        stores: &'a [&'a nn::VarStore],
        inputs: &'a [Vec<f32>],
        spec: &'a ResNetSpec,
        version: &str,
    ) -> EnsembleExportRequest<'a> {
        EnsembleExportRequest {
            spec,
            members: stores,
            tta_flip: true,
            temperature: 1.7,
            calibration: Some(calibration(1.7)),
            threshold: 0.4,
            metrics: serde_json::json!({"auroc": 0.5}),
            training: serde_json::json!({"folds": stores.len()}),
            parity_inputs: inputs,
            version: Some(version.into()),
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// Three members, the flip, T = 1.7: tract's graph agrees with tch's
    /// average, the manifest says what the graph is, and a worker's engine
    /// loads it and passes its canary. The check can fail: dropping the
    /// flip or the temperature from tch's side moves the probabilities far
    /// past the tolerance.
    #[test]
    fn ensemble_export_passes_parity_and_loads() {
        let members: Vec<_> = (0..3).map(|i| member(40 + i)).collect();
        let stores: Vec<&nn::VarStore> = members.iter().map(|(vs, _)| vs).collect();
        let inputs = parity_inputs();
        let spec = spec();
        let tmp = tempfile::tempdir().unwrap();
        let req = request(&stores, &inputs, &spec, "ens-1");
        let e = export_ensemble(&req, tmp.path()).unwrap();
        eprintln!(
            "ensemble K=3 + flip, T=1.7 @32: parity max abs diff {:e}",
            e.parity_max_abs_diff
        );
        assert!(e.parity_max_abs_diff <= PARITY_TOLERANCE);

        let graph = req.graph_spec().unwrap();
        assert_eq!(
            (graph.members, graph.tta_flip, graph.temperature),
            (3, true, 1.7)
        );
        let m = &e.manifest;
        assert_eq!(m.spec, graph);
        assert_eq!(m.calibration, Some(calibration(1.7)));
        assert_eq!(m.threshold, 0.4);
        assert_eq!(m.golden.len(), GOLDEN_SEEDS.len());
        let files = ModelFiles::read_dir(&e.dir).unwrap();
        assert_eq!(&files.manifest, m);

        let engine = Engine::load(&e.dir).unwrap();
        engine.canary(1e-6).unwrap();
        let nets: Vec<&ResNet> = members.iter().map(|(_, n)| n).collect();
        let golden: Vec<Vec<f32>> = GOLDEN_SEEDS
            .iter()
            .map(|&s| golden_input(s, SIZE))
            .collect();
        let want = tch_ensemble_probabilities(&nets, Device::Cpu, &graph, &golden).unwrap();
        for (g, w) in m.golden.iter().zip(want.chunks(2)) {
            assert!(
                max_abs_diff(&g.expected, w) <= PARITY_TOLERANCE,
                "{g:?} vs {w:?}"
            );
        }

        // What a wrong graph would be compared with: each is far from it.
        let reference = tch_ensemble_probabilities(&nets, Device::Cpu, &graph, &inputs).unwrap();
        for (what, other) in [
            (
                "no flip",
                ResNetSpec {
                    tta_flip: false,
                    ..graph.clone()
                },
            ),
            (
                "no temperature",
                ResNetSpec {
                    temperature: 1.0,
                    ..graph.clone()
                },
            ),
        ] {
            let p = tch_ensemble_probabilities(&nets, Device::Cpu, &other, &inputs).unwrap();
            let d = max_abs_diff(&p, &reference);
            eprintln!("{what}: tch probabilities move by {d:e}");
            assert!(d > 10.0 * PARITY_TOLERANCE, "{what}: {d:e}");
        }
        let one = tch_ensemble_probabilities(
            &nets[..1],
            Device::Cpu,
            &ResNetSpec {
                members: 1,
                ..graph.clone()
            },
            &inputs,
        )
        .unwrap();
        assert!(max_abs_diff(&one, &reference) > 10.0 * PARITY_TOLERANCE);
    }

    /// Platt's bias rides in the members' final-layer bias: the served graph
    /// gives `mean sigmoid(margin / T + b)` over members and views of the
    /// untouched members, and the caller's stores are not changed.
    #[test]
    fn platt_bias_is_served_by_the_graph() {
        let members: Vec<_> = (0..2).map(|i| member(60 + i)).collect();
        let stores: Vec<&nn::VarStore> = members.iter().map(|(vs, _)| vs).collect();
        let before: Vec<Vec<f32>> = stores
            .iter()
            .map(|vs| model::to_f32_vec(&vs.variables()["fc.bias"]).unwrap())
            .collect();
        let inputs = parity_inputs();
        let spec = spec();
        let tmp = tempfile::tempdir().unwrap();
        let (t, b) = (1.7f32, -1.3f32);
        let req = EnsembleExportRequest {
            calibration: Some(CalibrationRecord {
                method: CalibrationMethod::Platt,
                bias: Some(b),
                ..calibration(t)
            }),
            ..request(&stores, &inputs, &spec, "platt-1")
        };
        let e = export_ensemble(&req, tmp.path()).unwrap();
        assert!(e.parity_max_abs_diff <= PARITY_TOLERANCE);
        for (vs, was) in stores.iter().zip(&before) {
            assert_eq!(&model::to_f32_vec(&vs.variables()["fc.bias"]).unwrap(), was);
        }
        let engine = Engine::load(&e.dir).unwrap();
        let mut scorer = engine.scorer().unwrap();
        let s = i64::from(SIZE);
        for x in &inputs {
            let xs = Tensor::from_slice(x).view([1, 1, s, s]);
            let mut sum = 0.0;
            let mut n = 0.0;
            for (_, net) in &members {
                let v = crate::recipe::eval_views(net, &xs, true);
                for m in &v.margins {
                    let z = f64::from(m.double_value(&[0]));
                    sum += crate::calibration::sigmoid(z / f64::from(t) + f64::from(b));
                    n += 1.0;
                }
            }
            let want = (sum / n) as f32;
            let got = scorer.probabilities(x).unwrap()[0];
            assert!(
                (got - want).abs() < 1e-5,
                "tract {got} vs sigmoid(z/T + b) {want}"
            );
        }
        // Without the bias the graph would be far off: the check can fail.
        let plain =
            export_ensemble(&request(&stores, &inputs, &spec, "plain-1"), tmp.path()).unwrap();
        let p_plain = Engine::load(&plain.dir)
            .unwrap()
            .scorer()
            .unwrap()
            .probabilities(&inputs[0])
            .unwrap()[0];
        let p_platt = scorer.probabilities(&inputs[0]).unwrap()[0];
        assert!((p_plain - p_platt).abs() > 0.01, "{p_plain} vs {p_platt}");
    }

    /// One corrupted statistic of one member fails the check and writes nothing.
    #[test]
    fn perturbed_member_fails_parity_and_writes_nothing() {
        let members: Vec<_> = (0..3).map(|i| member(50 + i)).collect();
        let stores: Vec<&nn::VarStore> = members.iter().map(|(vs, _)| vs).collect();
        let inputs = parity_inputs();
        let spec = spec();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("models");
        let req = request(&stores, &inputs, &spec, "broken");
        let err = export_ensemble_with(&req, &out, |w| {
            w.get_mut("m2.fc.bias").unwrap().data[0] += 1.0;
        })
        .unwrap_err();
        match err {
            ExportError::Parity { max_abs_diff, .. } => {
                eprintln!("m2.fc.bias[0] += 1: parity max abs diff {max_abs_diff:e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!out.exists());
    }

    /// One member, no flip, temperature 1 is the single model: the same
    /// ONNX bytes and the same manifest as `export` of that network; and
    /// three copies of it give the same probabilities.
    #[test]
    fn one_member_is_the_single_export_and_copies_change_nothing() {
        let (vs, net) = member(60);
        let inputs = parity_inputs();
        let spec = spec();
        let tmp = tempfile::tempdir().unwrap();
        let single = export(
            &net,
            &vs,
            Device::Cpu,
            &ExportRequest {
                spec: &spec,
                threshold: 0.4,
                metrics: serde_json::json!({"auroc": 0.5}),
                training: serde_json::json!({"folds": 1}),
                parity_inputs: &inputs,
                version: Some("single".into()),
            },
            tmp.path(),
        )
        .unwrap();
        let stores = [&vs];
        let req = EnsembleExportRequest {
            tta_flip: false,
            temperature: 1.0,
            calibration: None,
            ..request(&stores, &inputs, &spec, "one")
        };
        let one = export_ensemble(&req, tmp.path()).unwrap();
        let bytes = |dir: &Path| std::fs::read(dir.join("model.onnx")).unwrap();
        assert_eq!(bytes(&one.dir), bytes(&single.dir));
        let mut m = one.manifest.clone();
        m.version = single.manifest.version.clone();
        m.created_at = single.manifest.created_at.clone();
        assert_eq!(m, single.manifest);

        let copies = [&vs, &vs, &vs];
        let req = EnsembleExportRequest {
            tta_flip: false,
            calibration: None,
            temperature: 1.0,
            ..request(&copies, &inputs, &spec, "copies")
        };
        let three = export_ensemble(&req, tmp.path()).unwrap();
        for (a, b) in three.manifest.golden.iter().zip(&single.manifest.golden) {
            assert!(
                max_abs_diff(&a.expected, &b.expected) < 1e-6,
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn bad_ensemble_requests_are_refused_before_writing() {
        let members: Vec<_> = (0..2).map(|i| member(70 + i)).collect();
        let stores: Vec<&nn::VarStore> = members.iter().map(|(vs, _)| vs).collect();
        let inputs = parity_inputs();
        let spec = spec();
        let tmp = tempfile::tempdir().unwrap();
        let base = || request(&stores, &inputs, &spec, "bad");
        let none: [&nn::VarStore; 0] = [];
        let ensemble_spec = ResNetSpec {
            members: 2,
            ..spec.clone()
        };
        let seventeen = vec![stores[0]; 17];
        let (wide_vs, _) = {
            tch::manual_seed(1);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = ResNet::new(
                &vs.root(),
                &ResNetSpec {
                    image_size: SIZE,
                    ..ResNetSpec::with_width(8)
                },
            );
            (vs, net)
        };
        let mixed = [stores[0], &wide_vs];
        type Check = fn(&ExportError) -> bool;
        let cases: [(&str, EnsembleExportRequest, Check); 8] = [
            (
                "no members",
                EnsembleExportRequest {
                    members: &none,
                    ..base()
                },
                |e| matches!(e, ExportError::Invalid(_)),
            ),
            (
                "17 members",
                EnsembleExportRequest {
                    members: &seventeen,
                    ..base()
                },
                |e| matches!(e, ExportError::Onnx(_)),
            ),
            (
                "spec not plain",
                EnsembleExportRequest {
                    spec: &ensemble_spec,
                    ..base()
                },
                |e| matches!(e, ExportError::Invalid(_)),
            ),
            (
                "temperature 0",
                EnsembleExportRequest {
                    temperature: 0.0,
                    calibration: None,
                    ..base()
                },
                |e| matches!(e, ExportError::Onnx(_)),
            ),
            (
                "record of another T",
                EnsembleExportRequest {
                    calibration: Some(calibration(1.2)),
                    ..base()
                },
                |e| matches!(e, ExportError::Invalid(_)),
            ),
            (
                "a member of another shape",
                EnsembleExportRequest {
                    members: &mixed,
                    ..base()
                },
                |e| matches!(e, ExportError::Model(_)),
            ),
            (
                "bad version",
                EnsembleExportRequest {
                    version: Some("..".into()),
                    ..base()
                },
                |e| matches!(e, ExportError::Invalid(_)),
            ),
            (
                "threshold 1",
                EnsembleExportRequest {
                    threshold: 1.0,
                    ..base()
                },
                |e| matches!(e, ExportError::Manifest(_)),
            ),
        ];
        for (what, req, expected) in cases {
            match export_ensemble(&req, tmp.path()) {
                Err(e) if expected(&e) => eprintln!("{what}: {e}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}

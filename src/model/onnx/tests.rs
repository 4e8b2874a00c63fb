use super::*;
use tract_onnx::prelude::*;

fn tiny(image_size: u32) -> ResNetSpec {
    ResNetSpec {
        image_size,
        ..ResNetSpec::tiny()
    }
}

/// Loads `bytes` in tract for a fixed input shape and runs it.
fn run_tract(
    bytes: &[u8],
    shape: [usize; 4],
    input: &[f32],
) -> TractResult<(Vec<usize>, Vec<f32>)> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .with_input_fact(0, f32::fact(shape).into())?
        .into_optimized()?
        .into_runnable()?;
    let out = model.run(tvec!(Tensor::from_shape(&shape, input)?.into()))?;
    let view = out[0].to_plain_array_view::<f32>()?;
    Ok((view.shape().to_vec(), view.iter().copied().collect()))
}

fn random_input(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>()).collect()
}

fn assert_probabilities(shape: &[usize], probs: &[f32], batch: usize, classes: usize) {
    assert_eq!(shape, &[batch, classes]);
    for row in probs.chunks(classes) {
        assert!(row.iter().all(|p| p.is_finite() && *p >= 0.0), "{row:?}");
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
    }
}

#[test]
fn default_spec_params_match_tch_names() {
    let params = ResNetSpec::default().params();
    // conv1 + bn1(4) + 8 blocks x (2 convs + 2 BNs = 10) + 3 downsamples x 5 + fc(2).
    assert_eq!(params.len(), 1 + 4 + 8 * 10 + 3 * 5 + 2);
    let shape = |name: &str| {
        params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.shape.clone())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(params[0].name, "conv1.weight");
    assert_eq!(shape("conv1.weight"), vec![64, 1, 7, 7]);
    assert_eq!(shape("bn1.running_var"), vec![64]);
    assert_eq!(shape("layer1.0.conv1.weight"), vec![64, 64, 3, 3]);
    assert_eq!(shape("layer1.1.bn2.bias"), vec![64]);
    assert_eq!(shape("layer2.0.conv1.weight"), vec![128, 64, 3, 3]);
    assert_eq!(shape("layer2.0.downsample.0.weight"), vec![128, 64, 1, 1]);
    assert_eq!(shape("layer2.0.downsample.1.running_mean"), vec![128]);
    assert_eq!(shape("layer4.1.conv2.weight"), vec![512, 512, 3, 3]);
    assert_eq!(shape("fc.weight"), vec![2, 512]);
    assert_eq!(shape("fc.bias"), vec![2]);
    assert_eq!(params.last().unwrap().name, "fc.bias");
    // Stage 1 keeps channels and stride: no downsample there.
    assert!(!params
        .iter()
        .any(|p| p.name.starts_with("layer1.0.downsample")));
    assert!(!params
        .iter()
        .any(|p| p.name.starts_with("layer2.1.downsample")));
    // ResNet-18 has 11.17M trainable parameters at 3 input channels; at 1
    // input channel the stem loses 2*64*49 and the head is 2 classes.
    let trainable: usize = params
        .iter()
        .filter(|p| p.trainable())
        .map(|p| p.numel())
        .sum();
    assert_eq!(trainable, 11_689_512 - 2 * 64 * 49 - 998 * 513);
    let names: BTreeSet<_> = params.iter().map(|p| &p.name).collect();
    assert_eq!(names.len(), params.len(), "names are unique");
}

#[test]
fn with_width_scales_stages() {
    let s = ResNetSpec::with_width(4);
    assert_eq!((s.stem_width, s.widths.clone()), (4, vec![4, 8, 16, 32]));
    assert_eq!(s.image_size, 256);
    assert_eq!(s.blocks, vec![2, 2, 2, 2]);
}

#[test]
fn write_onnx_refuses_bad_weights() {
    let spec = tiny(32);
    let good = init_weights(&spec, 1);
    assert!(write_onnx(&spec, &good).is_ok());

    let mut w = good.clone();
    w.remove("layer3.0.bn1.running_var");
    match write_onnx(&spec, &w) {
        Err(OnnxError::MissingWeight { name }) => assert_eq!(name, "layer3.0.bn1.running_var"),
        other => panic!("{other:?}"),
    }

    let mut w = good.clone();
    w.insert("fc.weight", vec![32, 2], vec![0.0; 64]);
    match write_onnx(&spec, &w) {
        Err(OnnxError::ShapeMismatch {
            name,
            expected,
            found,
        }) => {
            assert_eq!(
                (name.as_str(), expected, found),
                ("fc.weight", vec![2, 32], vec![32, 2])
            );
        }
        other => panic!("{other:?}"),
    }

    let mut w = good.clone();
    w.get_mut("fc.bias").unwrap().data.push(0.0);
    assert!(matches!(
        write_onnx(&spec, &w),
        Err(OnnxError::DataLength { .. })
    ));

    let mut w = good.clone();
    w.get_mut("conv1.weight").unwrap().data[3] = f32::NAN;
    assert!(matches!(
        write_onnx(&spec, &w),
        Err(OnnxError::NonFinite { index: 3, .. })
    ));

    let mut w = good.clone();
    w.insert("bn1.num_batches_tracked", vec![1], vec![0.0]);
    match write_onnx(&spec, &w) {
        Err(OnnxError::UnexpectedWeight { name }) => {
            assert_eq!(name, "bn1.num_batches_tracked")
        }
        other => panic!("{other:?}"),
    }

    let bad = ResNetSpec {
        blocks: vec![2, 2],
        ..spec.clone()
    };
    assert!(matches!(
        write_onnx(&bad, &good),
        Err(OnnxError::InvalidSpec(_))
    ));
    let bad = ResNetSpec {
        image_size: 16,
        ..spec
    };
    assert!(matches!(
        write_onnx(&bad, &good),
        Err(OnnxError::InvalidSpec(_))
    ));
}

#[test]
fn model_structure_is_as_declared() {
    let spec = tiny(32);
    let bytes = write_onnx(&spec, &init_weights(&spec, 0)).unwrap();
    let model = pb::ModelProto::decode(&bytes[..]).unwrap();
    assert_eq!(model.ir_version, 8);
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!(
        (
            model.opset_import[0].domain.as_str(),
            model.opset_import[0].version
        ),
        ("", 17)
    );
    assert_eq!(model.producer_name, "pleura");
    let g = model.graph.unwrap();
    assert_eq!(g.input.len(), 1, "initializers are not graph inputs");
    assert_eq!(g.input[0].name, INPUT_NAME);
    assert_eq!(g.output.len(), 1);
    assert_eq!(g.output[0].name, OUTPUT_NAME);
    let names: BTreeSet<_> = g.node.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), g.node.len(), "node names are unique");
    let init: Vec<_> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let params: Vec<_> = spec.params().into_iter().map(|p| p.name).collect();
    assert_eq!(init, params);
    assert!(g
        .initializer
        .iter()
        .all(|t| t.float_data.is_empty() && !t.raw_data.is_empty()));
    let bn = g
        .node
        .iter()
        .find(|n| n.op_type == "BatchNormalization")
        .unwrap();
    assert_eq!(bn.attribute[0].name, "epsilon");
    assert_eq!(bn.attribute[0].f, 1e-5);
    assert_eq!(g.node.last().unwrap().op_type, "Softmax");
}

#[test]
fn tract_runs_tiny_model_batch_1_and_3() {
    let spec = tiny(64);
    let bytes = write_onnx(&spec, &init_weights(&spec, 7)).unwrap();
    for batch in [1usize, 3] {
        let shape = [batch, 1, 64, 64];
        let input = random_input(batch * 64 * 64, 3);
        let (out_shape, probs) = run_tract(&bytes, shape, &input).unwrap();
        assert_probabilities(&out_shape, &probs, batch, 2);
    }
}

#[test]
fn init_is_deterministic() {
    let spec = tiny(32);
    let a = write_onnx(&spec, &init_weights(&spec, 42)).unwrap();
    let b = write_onnx(&spec, &init_weights(&spec, 42)).unwrap();
    let c = write_onnx(&spec, &init_weights(&spec, 43)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let w = init_weights(&spec, 42);
    assert!(w.get("bn1.weight").unwrap().data.iter().all(|v| *v == 1.0));
    assert!(w
        .get("bn1.running_mean")
        .unwrap()
        .data
        .iter()
        .all(|v| *v == 0.0));
    assert!(w.get("fc.bias").unwrap().data.iter().all(|v| *v == 0.0));
    // Kaiming fan_out: std = sqrt(2 / (out * k * k)).
    let conv = &w.get("layer4.0.conv1.weight").unwrap().data;
    let var = conv.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / conv.len() as f64;
    let expected = 2.0 / (32.0 * 9.0);
    assert!(
        (var / expected - 1.0).abs() < 0.05,
        "variance {var} vs {expected}"
    );
}

// ---- A naive reference forward pass, NCHW, single image at a time. ----

struct Act {
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f32>,
}

fn conv(x: &Act, wt: &WeightTensor, stride: usize, pad: usize) -> Act {
    let (o, k) = (wt.shape[0] as usize, wt.shape[2] as usize);
    let oh = (x.h + 2 * pad - k) / stride + 1;
    let ow = (x.w + 2 * pad - k) / stride + 1;
    let mut v = vec![0f32; o * oh * ow];
    for oc in 0..o {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0f64;
                for ic in 0..x.c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                                continue;
                            }
                            let xv = x.v[(ic * x.h + iy as usize) * x.w + ix as usize];
                            let wv = wt.data[((oc * x.c + ic) * k + ky) * k + kx];
                            acc += (xv * wv) as f64;
                        }
                    }
                }
                v[(oc * oh + oy) * ow + ox] = acc as f32;
            }
        }
    }
    Act {
        c: o,
        h: oh,
        w: ow,
        v,
    }
}

fn bn(mut x: Act, w: &Weights, path: &str) -> Act {
    let g = |f: &str| &w.get(&format!("{path}.{f}")).unwrap().data;
    let (gamma, beta, mean, var) = (g("weight"), g("bias"), g("running_mean"), g("running_var"));
    let hw = x.h * x.w;
    for (i, v) in x.v.iter_mut().enumerate() {
        let c = i / hw;
        *v = (*v - mean[c]) / (var[c] + BN_EPSILON).sqrt() * gamma[c] + beta[c];
    }
    x
}

fn relu(mut x: Act) -> Act {
    x.v.iter_mut().for_each(|v| *v = v.max(0.0));
    x
}

fn maxpool(x: &Act) -> Act {
    let (oh, ow) = ((x.h - 1) / 2 + 1, (x.w - 1) / 2 + 1);
    let mut v = vec![f32::NEG_INFINITY; x.c * oh * ow];
    for c in 0..x.c {
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                        if iy >= 0 && ix >= 0 && (iy as usize) < x.h && (ix as usize) < x.w {
                            let o = &mut v[(c * oh + oy) * ow + ox];
                            *o = o.max(x.v[(c * x.h + iy as usize) * x.w + ix as usize]);
                        }
                    }
                }
            }
        }
    }
    Act {
        c: x.c,
        h: oh,
        w: ow,
        v,
    }
}

fn reference_forward(spec: &ResNetSpec, w: &Weights, image: &[f32]) -> Vec<f32> {
    softmax(&reference_logits(spec, w, "", image), 1.0)
}

/// `softmax(logits / t)`, in f64.
fn softmax(logits: &[f32], t: f64) -> Vec<f32> {
    let z: Vec<f64> = logits.iter().map(|l| *l as f64 / t).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

/// The logits of the network whose weights are `w`'s under `prefix`.
fn reference_logits(spec: &ResNetSpec, w: &Weights, prefix: &str, image: &[f32]) -> Vec<f32> {
    let owned: Weights;
    let w = if prefix.is_empty() {
        w
    } else {
        let mut m = Weights::new();
        for (name, t) in w.iter() {
            if let Some(bare) = name.strip_prefix(prefix) {
                m.insert(bare, t.shape.clone(), t.data.clone());
            }
        }
        owned = m;
        &owned
    };
    let s = spec.image_size as usize;
    let x = Act {
        c: spec.in_channels as usize,
        h: s,
        w: s,
        v: image.to_vec(),
    };
    let x = relu(bn(conv(&x, w.get("conv1.weight").unwrap(), 2, 3), w, "bn1"));
    let mut x = maxpool(&x);
    for b in spec.block_layout() {
        let p = &b.prefix;
        let st = b.stride as usize;
        let y = conv(&x, w.get(&format!("{p}.conv1.weight")).unwrap(), st, 1);
        let y = relu(bn(y, w, &format!("{p}.bn1")));
        let y = conv(&y, w.get(&format!("{p}.conv2.weight")).unwrap(), 1, 1);
        let mut y = bn(y, w, &format!("{p}.bn2"));
        let short = if b.downsample {
            let s = conv(
                &x,
                w.get(&format!("{p}.downsample.0.weight")).unwrap(),
                st,
                0,
            );
            bn(s, w, &format!("{p}.downsample.1"))
        } else {
            x
        };
        y.v.iter_mut().zip(&short.v).for_each(|(a, b)| *a += b);
        x = relu(y);
    }
    let hw = (x.h * x.w) as f32;
    let pooled: Vec<f32> =
        x.v.chunks(x.h * x.w)
            .map(|c| c.iter().sum::<f32>() / hw)
            .collect();
    let fc = w.get("fc.weight").unwrap();
    let bias = &w.get("fc.bias").unwrap().data;
    fc.data
        .chunks(pooled.len())
        .zip(bias)
        .map(|(row, b)| row.iter().zip(&pooled).map(|(a, p)| a * p).sum::<f32>() + b)
        .collect()
}

/// Every tensor of `spec`'s graph random (BN variances in [0.5, 1.5), the
/// rest in [-0.5, 0.5)), so a swapped or ignored tensor shows.
fn random_weights(spec: &ResNetSpec, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::new();
    for p in spec.graph_params() {
        let positive = p.name.ends_with("running_var");
        let data = (0..p.numel())
            .map(|_| {
                let u = rng.random::<f32>();
                if positive {
                    0.5 + u
                } else {
                    u - 0.5
                }
            })
            .collect();
        w.insert(p.name, p.shape, data);
    }
    w
}

/// Tract's output equals a hand-written forward pass. The spec covers
/// both downsample triggers (channel change at stride 1 in stage 1, stride
/// 2 later), an identity shortcut, 3 classes and batch 2, and every tensor
/// (BN statistics included) is random so a swapped or ignored input shows.
#[test]
fn tract_matches_reference_forward_pass() {
    let spec = ResNetSpec {
        in_channels: 1,
        image_size: 32,
        stem_width: 3,
        widths: vec![4, 8, 8],
        blocks: vec![2, 1, 1],
        num_classes: 3,
        ..ResNetSpec::default()
    };
    let w = random_weights(&spec, 5);
    assert!(w.get("layer1.0.downsample.0.weight").is_some());
    assert!(w.get("layer1.1.downsample.0.weight").is_none());
    let bytes = write_onnx(&spec, &w).unwrap();
    let batch = 2;
    let input = random_input(batch * 32 * 32, 11);
    let (shape, got) = run_tract(&bytes, [batch, 1, 32, 32], &input).unwrap();
    assert_probabilities(&shape, &got, batch, 3);
    let expected: Vec<f32> = input
        .chunks(32 * 32)
        .flat_map(|img| reference_forward(&spec, &w, img))
        .collect();
    for (g, e) in got.iter().zip(&expected) {
        assert!(
            (g - e).abs() < 1e-4,
            "tract {got:?} vs reference {expected:?}"
        );
    }
    // Guard against a degenerate comparison (all rows uniform).
    assert!(
        expected.iter().any(|p| (p - 1.0 / 3.0).abs() > 1e-3),
        "{expected:?}"
    );
}

/// The real seed model: ResNet-18 at 256x256 loads, optimises and runs.
#[test]
fn default_model_runs_in_tract() {
    let spec = ResNetSpec::default();
    let t0 = std::time::Instant::now();
    let bytes = write_onnx(&spec, &init_weights(&spec, 0)).unwrap();
    let t1 = std::time::Instant::now();
    let shape = [1, 1, 256, 256];
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let t2 = std::time::Instant::now();
    let input = Tensor::from_shape(&shape, &random_input(256 * 256, 1)).unwrap();
    let out = model.run(tvec!(input.into())).unwrap();
    let t3 = std::time::Instant::now();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    let probs: Vec<f32> = view.iter().copied().collect();
    assert_probabilities(view.shape(), &probs, 1, 2);
    eprintln!(
        "resnet18@256: {} MB onnx; init+write {:?}, load+optimise {:?}, one inference {:?}",
        bytes.len() / 1_000_000,
        t1 - t0,
        t2 - t1,
        t3 - t2
    );
}

// ---- Ensembles, test-time flip, temperature. ----

/// The small network of the reference test: every path of the block layout,
/// three classes, quick to run by hand.
fn small() -> ResNetSpec {
    ResNetSpec {
        image_size: 32,
        stem_width: 3,
        widths: vec![4, 8, 8],
        blocks: vec![2, 1, 1],
        num_classes: 3,
        ..ResNetSpec::default()
    }
}

/// Weights whose output depends on the image, for tests that must see a
/// flip: [`init_weights`] (Kaiming convs) with every batch-norm tensor
/// moved a little at random, so each member's statistics are its own, and
/// every fc weight 30 times larger for sharper logits. ([`random_weights`]'s
/// wide batch-norm statistics wash the image out: a mirror image moved its
/// outputs by about 1e-5.)
fn image_sensitive(spec: &ResNetSpec, seed: u64) -> Weights {
    let mut w = init_weights(spec, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb4);
    let bn: Vec<String> = w
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n.contains("bn") || n.contains("downsample.1"))
        .collect();
    for n in bn {
        let one = n.ends_with(".weight") || n.ends_with(".running_var");
        for v in &mut w.get_mut(&n).unwrap().data {
            let u = rng.random::<f32>() * 0.4 - 0.2;
            *v = if one { 1.0 + u } else { u / 2.0 };
        }
    }
    sharpened(w)
}

fn sharpened(mut w: Weights) -> Weights {
    let names: Vec<String> = w
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n.ends_with("fc.weight"))
        .collect();
    for n in names {
        w.get_mut(&n)
            .unwrap()
            .data
            .iter_mut()
            .for_each(|v| *v *= 30.0);
    }
    w
}

/// `image` (one channel, `side`²) mirrored left to right.
fn mirror(image: &[f32], side: usize) -> Vec<f32> {
    image
        .chunks(side)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// sha256 of the model with `producer_version` cleared, so a release bump
/// does not count as a change of graph.
fn graph_sha(bytes: &[u8]) -> String {
    let mut model = pb::ModelProto::decode(bytes).unwrap();
    model.producer_version.clear();
    crate::model::manifest::sha256_hex(&model.encode_to_vec())
}

/// Plain models are byte for byte what the writer wrote before ensembles
/// existed. The hashes were taken from `pleura models init` built from the
/// commit before (b3c2b38) with `--seed 0 --width 4 --image-size 32` and
/// `--seed 3 --width 8 --image-size 64`, producer_version removed.
#[test]
fn plain_graph_bytes_are_unchanged() {
    let cases = [
        (
            tiny(32),
            0,
            "9200293f6416e88cf79133b7bd517c9fdf25434595d84d2ee37f432dc3fff936",
        ),
        (
            ResNetSpec {
                image_size: 64,
                ..ResNetSpec::with_width(8)
            },
            3,
            "69a6bf4db42d44647de3075ce3608df8b0b70fc4ef7f9de11c22b9d97247b2ba",
        ),
    ];
    for (spec, seed, sha) in cases {
        let explicit = ResNetSpec {
            members: 1,
            tta_flip: false,
            temperature: 1.0,
            ..spec.clone()
        };
        assert!(explicit.is_plain());
        let w = init_weights(&explicit, seed);
        let bytes = write_onnx(&explicit, &w).unwrap();
        assert_eq!(graph_sha(&bytes), sha, "{spec:?}");
        // One member through the ensemble path is the same graph.
        let one = Weights::from_members(vec![w]);
        assert_eq!(write_onnx(&spec, &one).unwrap(), bytes);
        // The metadata spec JSON says nothing new.
        let model = pb::ModelProto::decode(&bytes[..]).unwrap();
        let meta = &model.metadata_props[0].value;
        assert!(
            !meta.contains("members") && !meta.contains("tta") && !meta.contains("temperature"),
            "{meta}"
        );
    }
}

#[test]
fn graph_fields_are_validated() {
    let bad = |members: u32, temperature: f32| ResNetSpec {
        members,
        temperature,
        ..ResNetSpec::tiny()
    };
    for spec in [
        bad(0, 1.0),
        bad(MAX_MEMBERS + 1, 1.0),
        bad(1, 0.0),
        bad(1, -1.0),
        bad(1, f32::NAN),
        bad(1, f32::INFINITY),
    ] {
        match spec.validate() {
            Err(OnnxError::InvalidSpec(msg)) => eprintln!("{msg}"),
            other => panic!("{spec:?}: {other:?}"),
        }
        assert!(write_onnx(&spec, &init_weights(&spec.member(), 0)).is_err());
    }
    assert!(bad(MAX_MEMBERS, 0.05).validate().is_ok());
    // Writers that rebuild one network themselves (int8) refuse the rest.
    let spec = ResNetSpec {
        tta_flip: true,
        ..ResNetSpec::tiny()
    };
    assert!(matches!(
        check_weights(&spec, &init_weights(&spec, 0)),
        Err(OnnxError::NotPlain { tta_flip: true, .. })
    ));
    assert!(check_weights(&spec.member(), &init_weights(&spec, 0)).is_ok());
}

#[test]
fn ensemble_graph_is_as_declared() {
    let spec = ResNetSpec {
        members: 3,
        tta_flip: true,
        temperature: 1.7,
        ..tiny(32)
    };
    assert_eq!(spec.branches(), 6);
    let w = init_weights(&spec, 4);
    // Member 0 is the plain model of the same seed, member 1 another.
    let plain = init_weights(&spec.member(), 4);
    assert_eq!(w.get("m0.conv1.weight"), plain.get("conv1.weight"));
    assert_ne!(w.get("m1.conv1.weight"), plain.get("conv1.weight"));
    assert!(w.get("conv1.weight").is_none());
    let bytes = write_onnx(&spec, &w).unwrap();
    let model = pb::ModelProto::decode(&bytes[..]).unwrap();
    let g = model.graph.unwrap();
    let init: Vec<_> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut want: Vec<String> = spec.graph_params().into_iter().map(|p| p.name).collect();
    want.extend([FLIP_INDICES.to_string(), TEMPERATURE_NAME.to_string()]);
    let mut got: Vec<String> = init.iter().map(|s| s.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(spec.graph_params()[0].name, "m0.conv1.weight");
    let names: BTreeSet<_> = g.node.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), g.node.len(), "node names are unique");
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!(
        (
            count("Softmax"),
            count("Div"),
            count("Gather"),
            count("Mean")
        ),
        (6, 6, 1, 1)
    );
    let flip = g.node.iter().find(|n| n.op_type == "Gather").unwrap();
    assert_eq!(flip.attribute[0].name, "axis");
    assert_eq!(
        flip.attribute[0].i, 3,
        "width axis: left-right, not up-down"
    );
    let indices = g
        .initializer
        .iter()
        .find(|t| t.name == FLIP_INDICES)
        .unwrap();
    let idx: Vec<i64> = indices
        .raw_data
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(idx, (0..32).rev().collect::<Vec<i64>>());
    let last = g.node.last().unwrap();
    assert_eq!((last.op_type.as_str(), last.input.len()), ("Mean", 6));
    assert_eq!(last.output, [OUTPUT_NAME]);
    assert!(names.contains("m2.flip.layer4.1.conv2"));
    let conv = g.node.iter().find(|n| n.name == "m1.flip.conv1").unwrap();
    assert_eq!(conv.input, ["flip.out", "m1.conv1.weight"]);
    let meta: ResNetSpec = serde_json::from_str(&model.metadata_props[0].value).unwrap();
    assert_eq!(meta, spec);
    // The writer insists on the prefixed names.
    assert!(matches!(
        write_onnx(&spec, &plain),
        Err(OnnxError::MissingWeight { .. })
    ));
}

/// The ensemble graph (3 members, flip, T = 1.7) computes, in tract, the
/// mean over members and mirror images of softmax(logits / T) of the
/// hand-written forward pass: parity of an ensemble graph with a reference
/// that shares no code with the writer.
#[test]
fn ensemble_graph_matches_reference() {
    let spec = ResNetSpec {
        members: 3,
        tta_flip: true,
        temperature: 1.7,
        ..small()
    };
    let w = image_sensitive(&spec, 21);
    let bytes = write_onnx(&spec, &w).unwrap();
    let batch = 2;
    let input = random_input(batch * 32 * 32, 22);
    let (shape, got) = run_tract(&bytes, [batch, 1, 32, 32], &input).unwrap();
    assert_probabilities(&shape, &got, batch, 3);
    let t = f64::from(spec.temperature);
    let mut expected = Vec::new();
    for image in input.chunks(32 * 32) {
        let mut mean = [0f64; 3];
        for i in 0..spec.members {
            let prefix = spec.member_prefix(i);
            for x in [image.to_vec(), mirror(image, 32)] {
                let p = softmax(&reference_logits(&spec, &w, &prefix, &x), t);
                mean.iter_mut()
                    .zip(&p)
                    .for_each(|(m, p)| *m += *p as f64 / 6.0);
            }
        }
        expected.extend(mean.iter().map(|m| *m as f32));
    }
    let diff = max_abs_diff(&got, &expected);
    eprintln!("ensemble K=3 + flip, T=1.7: tract vs reference max abs diff {diff:e}");
    assert!(diff < 1e-4, "tract {got:?} vs reference {expected:?}");
    // Not a degenerate comparison: the members disagree, and a member on
    // the mirror image disagrees with itself on the image.
    let x = &input[..1024];
    let m0 = softmax(&reference_logits(&spec, &w, "m0.", x), t);
    let m1 = softmax(&reference_logits(&spec, &w, "m1.", x), t);
    let m0_flip = softmax(&reference_logits(&spec, &w, "m0.", &mirror(x, 32)), t);
    eprintln!(
        "members differ by {:e}, mirror images by {:e}",
        max_abs_diff(&m0, &m1),
        max_abs_diff(&m0, &m0_flip)
    );
    assert!(max_abs_diff(&m0, &m1) > 1e-3, "{m0:?} {m1:?}");
    assert!(max_abs_diff(&m0, &m0_flip) > 1e-4, "{m0:?} {m0_flip:?}");
}

/// K copies of one network average to that network.
#[test]
fn ensemble_of_identical_members_equals_the_single_model() {
    let spec = small();
    let w = random_weights(&spec, 31);
    let single = write_onnx(&spec, &w).unwrap();
    let ensemble_spec = ResNetSpec {
        members: 3,
        ..spec.clone()
    };
    let ensemble = write_onnx(
        &ensemble_spec,
        &Weights::from_members(vec![w.clone(), w.clone(), w]),
    )
    .unwrap();
    let input = random_input(2 * 32 * 32, 32);
    let (_, a) = run_tract(&single, [2, 1, 32, 32], &input).unwrap();
    let (_, b) = run_tract(&ensemble, [2, 1, 32, 32], &input).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-6, "single {a:?} vs 3 identical members {b:?}");
}

/// The flip mirrors left to right: on a left-right symmetric image the
/// flipped branch sees the same image, so TTA changes nothing (an up-down
/// flip would change it); on any image TTA is the mean of the plain graph
/// on the image and on its mirror.
#[test]
fn flip_tta_is_a_left_right_mirror() {
    let spec = small();
    let w = image_sensitive(&spec, 41);
    let plain = write_onnx(&spec, &w).unwrap();
    let tta_spec = ResNetSpec {
        tta_flip: true,
        ..spec.clone()
    };
    let tta = write_onnx(&tta_spec, &w).unwrap();
    let run = |bytes: &[u8], x: &[f32]| run_tract(bytes, [1, 1, 32, 32], x).unwrap().1;

    let half = random_input(32 * 16, 42);
    let symmetric: Vec<f32> = half
        .chunks(16)
        .flat_map(|row| {
            row.iter()
                .chain(row.iter().rev())
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(mirror(&symmetric, 32), symmetric);
    let diff = max_abs_diff(&run(&plain, &symmetric), &run(&tta, &symmetric));
    assert!(
        diff < 1e-6,
        "symmetric input: TTA moved the output by {diff:e}"
    );

    // A ramp from dark left to bright right with noise on it: mirrored, it
    // is a different image (noise alone mirrors into much the same
    // statistics, which the global pooling cannot tell apart).
    let x: Vec<f32> = random_input(32 * 32, 43)
        .iter()
        .enumerate()
        .map(|(i, n)| (i % 32) as f32 / 31.0 + 0.2 * n)
        .collect();
    let mean: Vec<f32> = run(&plain, &x)
        .iter()
        .zip(run(&plain, &mirror(&x, 32)))
        .map(|(a, b)| (a + b) / 2.0)
        .collect();
    let got = run(&tta, &x);
    assert!(max_abs_diff(&got, &mean) < 1e-6, "{got:?} vs {mean:?}");
    // The comparison can tell the directions apart: mirroring this image
    // moves the output, and upside down would have given another mean.
    let upside_down: Vec<f32> = x.chunks(32).rev().flatten().copied().collect();
    let mean_ud: Vec<f32> = run(&plain, &x)
        .iter()
        .zip(run(&plain, &upside_down))
        .map(|(a, b)| (a + b) / 2.0)
        .collect();
    let (moved, other) = (
        max_abs_diff(&got, &run(&plain, &x)),
        max_abs_diff(&got, &mean_ud),
    );
    eprintln!("flip moved the output by {moved:e}; an up-down flip would differ by {other:e}");
    assert!(moved > 1e-4 && other > 1e-4, "{moved:e} {other:e}");
}

/// softmax(logits / T) against a hand computation: with the fc weight zero
/// and its bias (2, -1), the logits are (2, -1) whatever the image, so
/// p = 1 / (1 + e^(-3 / T)).
#[test]
fn temperature_divides_the_logits_before_the_softmax() {
    let base = tiny(32);
    let mut w = init_weights(&base, 5);
    w.get_mut("fc.weight").unwrap().data.fill(0.0);
    w.get_mut("fc.bias").unwrap().data = vec![2.0, -1.0];
    let input = random_input(32 * 32, 6);
    for (t, p0) in [
        (1.0f32, 0.952_574_13_f64),
        (2.0, 0.817_574_48),
        (1.7, 1.0 / (1.0 + (-3.0f64 / 1.7).exp())),
        (0.5, 0.997_527_38),
    ] {
        let spec = ResNetSpec {
            temperature: t,
            ..base.clone()
        };
        let bytes = write_onnx(&spec, &w).unwrap();
        let model = pb::ModelProto::decode(&bytes[..]).unwrap();
        let divs = model
            .graph
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type == "Div")
            .count();
        assert_eq!(divs, usize::from(t != 1.0), "T = 1 writes no node");
        let (_, got) = run_tract(&bytes, [1, 1, 32, 32], &input).unwrap();
        assert!(
            (f64::from(got[0]) - p0).abs() < 1e-6 && (f64::from(got[1]) - (1.0 - p0)).abs() < 1e-6,
            "T = {t}: {got:?}, expected p = {p0}"
        );
    }
}

/// A worker loads an ensemble model like any other: the engine optimises
/// it, the canary holds it to golden cases from the independent reference,
/// and `LocalClassifier` classifies a scan with it.
#[test]
fn engine_serves_an_ensemble_model() {
    use crate::model::{golden_input, init_model, Engine, LocalClassifier};
    use image::ImageEncoder;

    let spec = ResNetSpec {
        members: 2,
        tta_flip: true,
        temperature: 1.3,
        ..tiny(32)
    };
    let mut files = init_model(&spec, 9).unwrap();
    let w = init_weights(&spec, 9);
    for seed in [1u64, 2] {
        let x = golden_input(seed, 32);
        let mut mean = [0f32; 2];
        for i in 0..spec.members {
            let prefix = spec.member_prefix(i);
            for x in [x.clone(), mirror(&x, 32)] {
                let p = softmax(&reference_logits(&spec, &w, &prefix, &x), 1.3);
                mean.iter_mut().zip(&p).for_each(|(m, p)| *m += p / 4.0);
            }
        }
        files
            .manifest
            .golden
            .push(crate::model::manifest::GoldenCase {
                name: format!("reference-{seed}"),
                input_seed: seed,
                expected: mean.to_vec(),
            });
    }
    let engine = Engine::from_files(files).unwrap();
    engine.canary(1e-4).unwrap();
    assert_eq!(engine.manifest().spec, spec);

    let mut png = Vec::new();
    let pixels: Vec<u8> = (0..64 * 64).map(|i| ((i * 37) % 251) as u8).collect();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, 64, 64, image::ExtendedColorType::L8)
        .unwrap();
    let mut classifier = LocalClassifier::new(std::sync::Arc::new(engine), Default::default());
    let verdict = classifier.classify(&png).unwrap();
    let p = verdict.classification.p_effusion;
    assert!(p.is_finite() && (0.0..=1.0).contains(&p), "{p}");
}

/// What an ensemble or the flip costs per scan in tract, beside the single
/// model: `cargo test -p pleura --lib -- --ignored ensemble_cost --nocapture`.
/// One inference thread through the engine bench ([`crate::model::bench`]),
/// as a worker's pool runs a state; a measurement, not a test. (The dev
/// profile builds tract at opt-level 2, so this is close to a release run.)
#[test]
#[ignore = "a measurement of several seconds per model; run on demand"]
fn ensemble_cost_per_scan() {
    use crate::model::{bench, golden_input, init_model, Engine};
    use std::sync::Arc;

    let configs: [(i64, u32, usize); 3] = [(16, 128, 60), (32, 128, 40), (64, 256, 12)];
    eprintln!("| width @ px | graph | branches | ONNX MB | load+optimise s | p50 ms/scan | scans/s (1 thread) | × single |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    for (width, size, images) in configs {
        let mut single_ms = 0.0;
        for (name, members, tta_flip) in [
            ("single", 1, false),
            ("flip TTA", 1, true),
            ("K=5", 5, false),
            ("K=5 + flip", 5, true),
        ] {
            let spec = ResNetSpec {
                image_size: size,
                members,
                tta_flip,
                temperature: 1.5,
                ..ResNetSpec::with_width(width)
            };
            let files = init_model(&spec, 1).unwrap();
            let mb = files.onnx.len() as f64 / 1e6;
            let t = std::time::Instant::now();
            let engine = Arc::new(Engine::from_files(files).unwrap());
            let load = t.elapsed().as_secs_f64();
            let inputs: Vec<Vec<f32>> = (1..=4).map(|s| golden_input(s, size)).collect();
            let images = images * if members == 1 { 5 } else { 1 } / spec.branches().min(2);
            let r = bench::throughput(&engine, &inputs, 1, images.max(5)).unwrap();
            if members == 1 && !tta_flip {
                single_ms = r.p50_ms;
            }
            eprintln!(
                "| {width} @ {size} | {name} | {} | {mb:.1} | {load:.1} | {:.1} | {:.1} | {:.2} |",
                spec.branches(),
                r.p50_ms,
                r.images_per_second,
                r.p50_ms / single_ms
            );
        }
    }
}

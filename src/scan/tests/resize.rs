//! Resizing and min-max normalisation.

use super::*;

// ---- preprocess ---------------------------------------------------------------------------

#[test]
fn normalises_min_max_and_never_divides_by_255() {
    // Values 100..=150 only: /255 would give 0.39..0.59; min-max must span exactly [0, 1].
    let n = 51u32;
    let raw: Vec<u8> = (0..n).flat_map(|_| (0..n).map(|x| 100 + x as u8)).collect();
    let png = encode_png(n, n, ExtendedColorType::L8, &raw);
    // Same size: the resize is a copy, so every value is checkable exactly.
    let out = load_scan(&png, &Limits::default(), n).unwrap();
    assert_eq!(min_max(&out), (0.0, 1.0));
    assert_eq!(out[25], 0.5);
    assert!((out[10] - 0.2).abs() < 1e-6);
    // Resized, the output still spans exactly [0, 1].
    let out = load_scan(&png, &Limits::default(), 16).unwrap();
    assert_eq!(min_max(&out), (0.0, 1.0));
}

#[test]
fn output_has_requested_size_for_non_square_input() {
    let img = GrayImage {
        width: 40,
        height: 25,
        data: (0..1000).map(|i| i as f32).collect(),
    };
    for size in [1u32, 7, 25, 64] {
        // A 1x1 output is necessarily flat.
        match preprocess(&img, size) {
            Ok(out) => assert_eq!(out.len(), (size * size) as usize),
            Err(e) => assert!(size == 1 && e == ScanError::BlankImage, "{size}: {e}"),
        }
    }
}

#[test]
fn flat_and_non_finite_images_are_blank() {
    let flat = GrayImage {
        width: 64,
        height: 64,
        data: vec![200.0; 64 * 64],
    };
    assert_eq!(preprocess(&flat, 16).unwrap_err(), ScanError::BlankImage);
    let flat_png = encode_png(32, 32, ExtendedColorType::L8, &[77; 32 * 32]);
    assert_eq!(
        code_of(load_scan(&flat_png, &Limits::default(), 16)),
        "blank_image"
    );
    // Contrast far below f32 precision at this magnitude is still flat.
    let mut almost = vec![1.0e6f32; 16];
    almost[3] = 1.0e6 + 0.0625;
    let almost = GrayImage {
        width: 4,
        height: 4,
        data: almost,
    };
    assert_eq!(preprocess(&almost, 4).unwrap_err(), ScanError::BlankImage);
    // The widest finite range still normalises (no inf - -inf overflow).
    let mut extreme = vec![-f32::MAX, 0.0, f32::MAX];
    normalise_min_max(&mut extreme).unwrap();
    assert_eq!(extreme, vec![0.0, 0.5, 1.0]);
    for bad in [f32::NAN, f32::INFINITY] {
        let mut data: Vec<f32> = (0..256).map(|i| i as f32).collect();
        data[100] = bad;
        let img = GrayImage {
            width: 16,
            height: 16,
            data,
        };
        assert_eq!(
            preprocess(&img, 8).unwrap_err(),
            ScanError::BlankImage,
            "{bad}"
        );
    }
}

#[test]
fn zero_sized_or_inconsistent_images_are_corrupt() {
    let empty = GrayImage {
        width: 0,
        height: 10,
        data: vec![],
    };
    assert_eq!(code_of(preprocess(&empty, 8)), "corrupt_image");
    let short = GrayImage {
        width: 4,
        height: 4,
        data: vec![1.0; 15],
    };
    assert_eq!(code_of(preprocess(&short, 8)), "corrupt_image");
    let ok = GrayImage {
        width: 4,
        height: 4,
        data: (0..16).map(|i| i as f32).collect(),
    };
    assert_eq!(code_of(preprocess(&ok, 0)), "invalid_size");
    // A PNG header announcing zero columns never reaches preprocess.
    assert_eq!(
        code_of(decode(&zero_png(0, 10), &Limits::default())),
        "corrupt_image"
    );
}

#[test]
fn resize_low_pass_filters_instead_of_point_sampling() {
    // A one-pixel checkerboard has mean 0.5 everywhere at coarse scale. Point sampling
    // (nearest) returns only 0s and 1s; a convolution averages to 0.5.
    let n = 64u32;
    let data = (0..n * n).map(|i| ((i % n + i / n) % 2) as f32).collect();
    let img = GrayImage {
        width: n,
        height: n,
        data,
    };
    let out = resize_f32(&img, 16).unwrap();
    for v in out {
        assert!((v - 0.5).abs() < 0.05, "{v}");
    }
    // A step edge survives downsampling in the right place.
    let data = (0..n * n)
        .map(|i| if i % n < n / 2 { 0.0 } else { 100.0 })
        .collect();
    let out = resize_f32(
        &GrayImage {
            width: n,
            height: n,
            data,
        },
        8,
    )
    .unwrap();
    assert!(out[0] < 1.0 && out[7] > 99.0, "{out:?}");
}

//! PNG and JPEG decoding.

use super::*;

// ---- raster decoding ---------------------------------------------------------------------

#[test]
fn gray16_png_keeps_native_scale() {
    let (w, h) = (16u32, 8u32);
    let samples: Vec<u16> = (0..w * h)
        .map(|i| if i % 3 == 0 { 1000 } else { 50_000 })
        .collect();
    let raw: Vec<u8> = samples.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let png = encode_png(w, h, ExtendedColorType::L16, &raw);
    let img = decode(&png, &Limits::default()).unwrap();
    let expected: Vec<f32> = samples.iter().map(|&v| f32::from(v)).collect();
    assert_eq!(
        img.data, expected,
        "16-bit samples must not be squashed to 8 bits"
    );
    let out = preprocess(&img, w).unwrap();
    assert_eq!(min_max(&out), (0.0, 1.0));
}

#[test]
fn gray_alpha_png_ignores_alpha() {
    let (w, h) = (20u32, 10u32);
    let gray = gradient8(w, h);
    let with_alpha: Vec<u8> = gray
        .iter()
        .enumerate()
        .flat_map(|(i, &g)| [g, (i * 37 % 256) as u8])
        .collect();
    let plain = decode(
        &encode_png(w, h, ExtendedColorType::L8, &gray),
        &Limits::default(),
    )
    .unwrap();
    let alpha = decode(
        &encode_png(w, h, ExtendedColorType::La8, &with_alpha),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(alpha, plain);
}

#[test]
fn colour_pngs_use_luminance_and_ignore_alpha() {
    let (w, h) = (12u32, 6u32);
    let gray = gradient8(w, h);
    let plain = decode(
        &encode_png(w, h, ExtendedColorType::L8, &gray),
        &Limits::default(),
    )
    .unwrap();
    let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    let rgba: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g, 255]).collect();
    let rgba16: Vec<u8> = gray
        .iter()
        .flat_map(|&g| {
            [
                u16::from(g) * 257,
                u16::from(g) * 257,
                u16::from(g) * 257,
                7,
            ]
        })
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    for (color, raw, scale) in [
        (ExtendedColorType::Rgb8, &rgb, 1.0f32),
        (ExtendedColorType::Rgba8, &rgba, 1.0),
        (ExtendedColorType::Rgba16, &rgba16, 257.0),
    ] {
        let img = decode(&encode_png(w, h, color, raw), &Limits::default()).unwrap();
        for (a, b) in img.data.iter().zip(&plain.data) {
            assert!((a / scale - b).abs() < 1e-3, "{color:?}: {a} vs {b}");
        }
    }
    // Weighted, not averaged: pure green is much brighter than pure blue.
    let green = decode(
        &encode_png(1, 1, ExtendedColorType::Rgb8, &[0, 255, 0]),
        &Limits::default(),
    )
    .unwrap();
    let blue = decode(
        &encode_png(1, 1, ExtendedColorType::Rgb8, &[0, 0, 255]),
        &Limits::default(),
    )
    .unwrap();
    assert!((green.data[0] - 0.7152 * 255.0).abs() < 1e-3);
    assert!((blue.data[0] - 0.0722 * 255.0).abs() < 1e-3);
}

#[test]
fn jpeg_gray_and_colour_decode() {
    let (w, h) = (64u32, 48u32);
    let gray = gradient8(w, h);
    let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    for (color, raw) in [
        (ExtendedColorType::L8, gray.clone()),
        (ExtendedColorType::Rgb8, rgb),
    ] {
        let img = decode(&encode_jpeg(w, h, color, &raw), &Limits::default()).unwrap();
        assert_eq!((img.width, img.height), (w, h));
        let expected = mean(gray.iter().map(|&g| f32::from(g)));
        assert!(
            (mean(img.data.iter().copied()) - expected).abs() < 2.0,
            "{color:?}"
        );
        let out = preprocess(&img, 32).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0));
    }
}

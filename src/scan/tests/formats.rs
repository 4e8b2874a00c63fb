//! Format detection, error codes and limits.

use super::*;

// ---- format detection -----------------------------------------------------------------

#[test]
fn detects_formats_from_magic_bytes() {
    let png = encode_png(4, 4, ExtendedColorType::L8, &[7; 16]);
    let jpeg = encode_jpeg(8, 8, ExtendedColorType::L8, &[7; 64]);
    let dicom = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
    assert_eq!(detect_format(&png), Some(ImageFormat::Png));
    assert_eq!(detect_format(&jpeg), Some(ImageFormat::Jpeg));
    assert_eq!(detect_format(&dicom), Some(ImageFormat::Dicom));
    // Preamble stripped, and preamble plus magic stripped.
    assert_eq!(
        detect_format(&dicom[DICOM_PREAMBLE_LEN..]),
        Some(ImageFormat::Dicom)
    );
    assert_eq!(
        detect_format(&dicom[DICOM_PREAMBLE_LEN + 4..]),
        Some(ImageFormat::Dicom)
    );
    assert_eq!(detect_format(b"hello world"), None);
    assert_eq!(detect_format(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"), None);
    assert_eq!(detect_format(b""), None);
    // A bare "DICM" 128 bytes in needs the preamble to be there.
    assert_eq!(detect_format(&[0u8; 131]), None);
}

#[test]
fn format_comes_from_bytes_not_file_name() {
    // PNG bytes saved under a DICOM name still load as PNG; the API never sees names.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scan.dcm");
    std::fs::write(
        &path,
        encode_png(16, 16, ExtendedColorType::L8, &gradient8(16, 16)),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(detect_format(&bytes), Some(ImageFormat::Png));
    assert_eq!(load_scan(&bytes, &Limits::default(), 8).unwrap().len(), 64);
}

#[test]
fn dicom_without_preamble_decodes() {
    let file = SynthDicom::new(2, 3, vec![10, 20, 30, 40, 50, 60]).build();
    let expected = decode(&file, &Limits::default()).unwrap();
    for variant in [&file[DICOM_PREAMBLE_LEN..], &file[DICOM_PREAMBLE_LEN + 4..]] {
        assert_eq!(decode(variant, &Limits::default()).unwrap(), expected);
    }
}

// ---- error mapping ----------------------------------------------------------------------

#[test]
fn error_codes_are_stable() {
    let cases = [
        (ScanError::Empty, "empty_body"),
        (ScanError::UnsupportedFormat, "unsupported_format"),
        (ScanError::CorruptImage("x".into()), "corrupt_image"),
        (
            ScanError::TooLarge {
                limit: LimitKind::Bytes,
                actual: Some(2),
                max: 1,
            },
            "too_large",
        ),
        (ScanError::BlankImage, "blank_image"),
        (ScanError::UnsupportedDicom("x".into()), "unsupported_dicom"),
        (ScanError::InvalidSize(0), "invalid_size"),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code, "{err}");
    }
}

#[test]
fn empty_input_is_empty_body() {
    assert_eq!(code_of(load_scan(&[], &Limits::default(), 8)), "empty_body");
}

#[test]
fn non_images_are_unsupported_format() {
    for bytes in [
        &b"hello world"[..],
        b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
        b"GIF89a\x01\x00",
    ] {
        assert_eq!(
            code_of(load_scan(bytes, &Limits::default(), 8)),
            "unsupported_format"
        );
    }
}

#[test]
fn truncated_png_is_corrupt() {
    let png = encode_png(64, 64, ExtendedColorType::L8, &gradient8(64, 64));
    for cut in [9, 20, 40, png.len() / 2, png.len() - 13] {
        let err = decode(&png[..cut], &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "corrupt_image", "cut at {cut}: {err}");
    }
}

#[test]
fn garbage_after_png_signature_is_corrupt() {
    let mut bytes = PNG_SIGNATURE.to_vec();
    let mut x = 0x1234_5678u32;
    bytes.extend((0..4096).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    assert_eq!(code_of(decode(&bytes, &Limits::default())), "corrupt_image");
}

#[test]
fn truncated_jpeg_header_is_corrupt() {
    let jpeg = encode_jpeg(32, 32, ExtendedColorType::L8, &gradient8(32, 32));
    assert_eq!(
        code_of(decode(&jpeg[..40], &Limits::default())),
        "corrupt_image"
    );
}

#[test]
fn png_bomb_is_too_large_before_decoding() {
    let bomb = zero_png(10_000, 10_000);
    assert!(bomb.len() < 1024 * 1024, "bomb is {} bytes", bomb.len());
    let started = Instant::now();
    let err = decode(&bomb, &Limits::default()).unwrap_err();
    eprintln!(
        "100 MP bomb ({} bytes) rejected in {:?}",
        bomb.len(),
        started.elapsed()
    );
    // Decoding it would have produced `blank_image` (all zeros), so `too_large` proves the
    // header check ran first.
    assert_eq!(
        err,
        ScanError::TooLarge {
            limit: LimitKind::Pixels,
            actual: Some(100_000_000),
            max: DEFAULT_MAX_PIXELS
        }
    );
}

#[test]
fn bomb_generator_makes_valid_pngs() {
    // Guards the test above: the same generator at a small size decodes completely.
    let img = decode(&zero_png(300, 200), &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (300, 200));
    assert!(img.data.iter().all(|&v| v == 0.0));
    assert_eq!(code_of(preprocess(&img, 16)), "blank_image");
}

#[test]
fn max_bytes_is_checked_first() {
    let png = encode_png(64, 64, ExtendedColorType::L8, &gradient8(64, 64));
    let limits = Limits {
        max_bytes: png.len() - 1,
        ..Limits::default()
    };
    assert_eq!(
        decode(&png, &limits).unwrap_err(),
        ScanError::TooLarge {
            limit: LimitKind::Bytes,
            actual: Some(png.len() as u64),
            max: png.len() as u64 - 1
        }
    );
    // Bytes are checked before the format: even garbage over the limit is too large.
    let limits = Limits {
        max_bytes: 4,
        ..Limits::default()
    };
    assert_eq!(code_of(decode(b"hello world", &limits)), "too_large");
    let limits = Limits {
        max_bytes: png.len(),
        ..Limits::default()
    };
    assert!(decode(&png, &limits).is_ok());
}

#[test]
fn max_pixels_is_exact() {
    let png = encode_png(10, 10, ExtendedColorType::L8, &gradient8(10, 10));
    let at_limit = Limits {
        max_pixels: 100,
        ..Limits::default()
    };
    assert!(decode(&png, &at_limit).is_ok());
    let below = Limits {
        max_pixels: 99,
        ..Limits::default()
    };
    assert_eq!(code_of(decode(&png, &below)), "too_large");
}

#[test]
fn limits_deserialize_with_defaults() {
    let limits: Limits = serde_json::from_str(r#"{"max_bytes": 1000}"#).unwrap();
    assert_eq!(
        limits,
        Limits {
            max_bytes: 1000,
            max_pixels: DEFAULT_MAX_PIXELS
        }
    );
    assert_eq!(Limits::default().max_bytes, DEFAULT_MAX_BYTES);
}

//! DICOM decoding, on synthetic files.

use super::*;

// ---- DICOM (synthetic) ------------------------------------------------------------------

#[test]
fn dicom_native_applies_rescale() {
    let mut dcm = SynthDicom::new(2, 3, vec![0, 10, 20, 30, 40, 50]);
    let img = decode(&dcm.build(), &Limits::default()).unwrap();
    assert_eq!((img.width, img.height), (3, 2));
    assert_eq!(img.data, vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
    dcm.rescale = Some((-100.0, 2.0));
    let img = decode(&dcm.build(), &Limits::default()).unwrap();
    assert_eq!(img.data, vec![-100.0, -80.0, -60.0, -40.0, -20.0, 0.0]);
}

#[test]
fn dicom_8bit_native_decodes() {
    let mut dcm = SynthDicom::new(3, 3, (0..9).map(|v| v * 25).collect());
    dcm.bits_allocated = 8;
    dcm.bits_stored = 8;
    let img = decode(&dcm.build(), &Limits::default()).unwrap();
    assert_eq!(
        img.data,
        (0..9).map(|v| (v * 25) as f32).collect::<Vec<_>>()
    );
}

#[test]
fn dicom_window_is_applied_after_rescale() {
    let mut dcm = SynthDicom::new(1, 5, vec![0, 100, 200, 300, 400]);
    dcm.rescale = Some((0.0, 0.5)); // modality values 0, 50, 100, 150, 200
    dcm.window = Some((100.0, 101.0)); // linear window spanning 50..150
    let img = decode(&dcm.build(), &Limits::default()).unwrap();
    assert_eq!(img.data[0], 0.0);
    assert_eq!(img.data[4], 1.0);
    assert!((img.data[2] - 0.5).abs() < 0.01, "{:?}", img.data);
    assert!(img.data[1] <= 0.01 && img.data[3] >= 0.99, "{:?}", img.data);
}

#[test]
fn dicom_monochrome1_is_inverted_to_monochrome2_polarity() {
    let pixels = vec![0, 100, 400, 1000, 4000, 4095];
    let mono2 = SynthDicom::new(2, 3, pixels.clone());
    let mut mono1 = mono2.clone();
    mono1.photometric = "MONOCHROME1";
    let a = decode(&mono2.build(), &Limits::default()).unwrap();
    let b = decode(&mono1.build(), &Limits::default()).unwrap();
    for (x, y) in a.data.iter().zip(&b.data) {
        assert_eq!(
            x + y,
            4095.0,
            "MONOCHROME1 must mirror within the value range"
        );
    }
    let pa = preprocess(&a, 3).unwrap();
    let pb = preprocess(&b, 3).unwrap();
    for (x, y) in pa.iter().zip(&pb) {
        assert!((x + y - 1.0).abs() < 1e-6);
    }
    // With a window, inversion happens after the window (display polarity).
    let mut windowed = mono1.clone();
    windowed.window = Some((2048.0, 4096.0));
    let w = decode(&windowed.build(), &Limits::default()).unwrap();
    assert!(
        w.data[0] > w.data[5],
        "air (low raw value) must end up bright in MONOCHROME1 input"
    );
}

#[test]
fn dicom_implicit_vr_decodes() {
    let mut out = dicom_header(uids::IMPLICIT_VR_LITTLE_ENDIAN);
    implicit_element(&mut out, (0x0008, 0x0060), b"DX");
    implicit_element(&mut out, (0x0028, 0x0002), &us(1));
    implicit_element(&mut out, (0x0028, 0x0004), b"MONOCHROME2 ");
    implicit_element(&mut out, (0x0028, 0x0010), &us(2));
    implicit_element(&mut out, (0x0028, 0x0011), &us(2));
    implicit_element(&mut out, (0x0028, 0x0100), &us(8));
    implicit_element(&mut out, (0x0028, 0x0101), &us(8));
    implicit_element(&mut out, (0x0028, 0x0102), &us(7));
    implicit_element(&mut out, (0x0028, 0x0103), &us(0));
    implicit_element(&mut out, (0x7FE0, 0x0010), &[5, 6, 7, 8]);
    let img = decode(&out, &Limits::default()).unwrap();
    assert_eq!(img.data, vec![5.0, 6.0, 7.0, 8.0]);
}

#[test]
fn dicom_without_pixel_data_is_unsupported() {
    let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    dcm.include_pixel_data = false;
    assert_eq!(
        code_of(decode(&dcm.build(), &Limits::default())),
        "unsupported_dicom"
    );
}

#[test]
fn dicom_unsupported_transfer_syntaxes() {
    for ts in [
        "1.2.840.10008.1.2.4.90",                 // JPEG 2000 lossless
        "1.2.840.10008.1.2.4.80",                 // JPEG-LS
        uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, // deflate: refused on purpose
    ] {
        let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        dcm.transfer_syntax = ts;
        let err = decode(&dcm.build(), &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "unsupported_dicom", "{ts}: {err}");
    }
    // Junk in the UID field is reported without being echoed.
    let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    dcm.transfer_syntax = "DOE^SECRET";
    let err = decode(&dcm.build(), &Limits::default()).unwrap_err();
    assert_eq!(err.code(), "unsupported_dicom");
    assert!(!err.to_string().contains("SECRET"), "{err}");
}

#[test]
fn dicom_unsupported_photometric_and_depth() {
    let mut rgb = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    rgb.photometric = "PALETTE COLOR";
    assert_eq!(
        code_of(decode(&rgb.build(), &Limits::default())),
        "unsupported_dicom"
    );
    let mut deep = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    deep.bits_allocated = 32;
    deep.bits_stored = 32;
    assert_eq!(
        code_of(decode(&deep.build(), &Limits::default())),
        "unsupported_dicom"
    );
    // Bits Stored 0 would trip an assertion deep in the LUT code; it must be an error.
    let mut zero = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    zero.bits_stored = 0;
    assert_eq!(
        code_of(decode(&zero.build(), &Limits::default())),
        "corrupt_image"
    );
}

#[test]
fn dicom_pixel_limit_is_checked_before_decoding() {
    // The header claims 10000x10000; the pixel data is tiny. Decoding would fail as
    // corrupt, so `too_large` proves the check came first.
    let dcm = SynthDicom::new(10_000, 10_000, vec![1, 2, 3, 4]);
    assert_eq!(
        decode(&dcm.build(), &Limits::default()).unwrap_err(),
        ScanError::TooLarge {
            limit: LimitKind::Pixels,
            actual: Some(100_000_000),
            max: DEFAULT_MAX_PIXELS
        }
    );
    let mut short = SynthDicom::new(100, 100, vec![1, 2, 3, 4]);
    short.bits_stored = 12;
    assert_eq!(
        code_of(decode(&short.build(), &Limits::default())),
        "corrupt_image"
    );
}

#[test]
fn dicom_lying_lengths_are_rejected_before_parsing() {
    // An OB element claiming ~4 GiB in a tiny file: the parser would zero-fill 4 GiB.
    let mut file = dicom_header(uids::EXPLICIT_VR_LITTLE_ENDIAN);
    file.extend_from_slice(&[
        0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
    ]);
    file.extend_from_slice(&[0; 64]);
    assert_eq!(code_of(decode(&file, &Limits::default())), "corrupt_image");

    // The same lie nested inside an item of a defined-length sequence.
    let mut inner = Vec::new();
    inner.extend_from_slice(&[
        0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0x7F,
    ]);
    inner.extend_from_slice(&[0; 16]);
    let mut item = Vec::new();
    item.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
    item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
    item.extend_from_slice(&inner);
    let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    assert!(decode(&dcm.build(), &Limits::default()).is_ok());
    element(&mut dcm.extra, (0x0009, 0x1001), b"SQ", &item);
    assert_eq!(
        code_of(decode(&dcm.build(), &Limits::default())),
        "corrupt_image"
    );

    // A lying file meta group length.
    let mut file = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
    file[DICOM_PREAMBLE_LEN + 4 + 8..DICOM_PREAMBLE_LEN + 4 + 12]
        .copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
    assert_eq!(code_of(decode(&file, &Limits::default())), "corrupt_image");
}

/// Found by the poison corpus: the parser reads on past the pixel data while tags do
/// not sort after it, so a second Pixel Data claiming ~4 GiB behind a valid image made
/// it zero-fill 4 GiB (the length walk used to stop at the first pixel data).
#[test]
fn dicom_lying_lengths_after_the_pixel_data_are_rejected() {
    for tag in [(0x7FE0, 0x0010), (0x0009, 0x0010), (0x7FE0, 0x0008)] {
        let mut file = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
        assert!(decode(&file, &Limits::default()).is_ok());
        let [g0, g1] = u16::to_le_bytes(tag.0);
        let [e0, e1] = u16::to_le_bytes(tag.1);
        file.extend_from_slice(&[g0, g1, e0, e1, b'O', b'B', 0, 0, 0xFE, 0xFF, 0xFF, 0xFF]);
        file.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode(&file, &Limits::default()),
            Err(ScanError::CorruptImage(
                "DICOM element length exceeds the available data".into()
            )),
            "{tag:x?}"
        );
    }
    // Trailing elements that sort after the pixel data (padding, signatures) are never
    // read, so whatever they claim is harmless.
    let mut file = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
    file.extend_from_slice(&[
        0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 0xFE, 0xFF, 0xFF, 0xFF,
    ]);
    file.extend_from_slice(&[0; 8]);
    assert!(decode(&file, &Limits::default()).is_ok());
}

/// Found by fuzzing (fuzz/regressions/dicom/oom-b0ad57d4...): the parser reads whole
/// values of a numeric element but advances by its full length, so an odd-length US
/// left it one byte behind, reading a header the length walk never saw, whose 2.6 GB
/// length it then allocated. Numeric lengths must be multiples of the value size.
#[test]
fn dicom_numeric_lengths_must_be_whole_values() {
    for (vr, len) in [(b"US", 3usize), (b"UL", 6), (b"FD", 12), (b"OW", 5)] {
        let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        element(&mut dcm.extra, (0x0009, 0x1010), vr, &vec![0; len]);
        assert_eq!(
            decode(&dcm.build(), &Limits::default()),
            Err(ScanError::CorruptImage(
                "DICOM numeric value length is not a multiple of its size".into()
            )),
            "{}",
            String::from_utf8_lossy(vr)
        );
    }
}

/// The same desynchronisation in implicit VR, where the parser takes the VR from its
/// dictionary: a group length (UL) of 6 bytes leaves it two bytes behind, where the
/// value's tail and the next header spell (0028,0102) with a 256 MiB length, while the
/// aligned walk sees a harmless 4 KiB element.
#[test]
fn dicom_implicit_numeric_lengths_must_be_whole_values() {
    let mut file = dicom_header(uids::IMPLICIT_VR_LITTLE_ENDIAN);
    file.extend_from_slice(&[0x28, 0x00, 0x00, 0x00, 6, 0, 0, 0]);
    file.extend_from_slice(&[0, 0, 0, 0, 0x28, 0x00]);
    file.extend_from_slice(&[0x02, 0x01, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00]);
    file.extend_from_slice(&[0; 0x1000]);
    assert_eq!(
        decode(&file, &Limits::default()),
        Err(ScanError::CorruptImage(
            "DICOM numeric value length is not a multiple of its size".into()
        ))
    );
    // Odd-length strings (a common slip of writers) are not refused.
    let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
    element(&mut dcm.extra, (0x0008, 0x0070), b"LO", b"ACM");
    assert!(decode(&dcm.build(), &Limits::default()).is_ok());
}

#[test]
fn dicom_sequences_are_walked_not_rejected() {
    // A well-formed defined-length sequence and an undefined-length one ahead of the image.
    let mut inner = Vec::new();
    element(&mut inner, (0x0008, 0x1150), b"UI", &text("1.2.3", 0));
    let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
    item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
    item.extend_from_slice(&inner);
    let mut dcm = SynthDicom::new(1, 2, vec![3, 9]);
    let extra = &mut dcm.extra;
    element(extra, (0x0009, 0x1001), b"SQ", &item);
    extra.extend_from_slice(&[
        0x09, 0x00, 0x02, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    extra.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    extra.extend_from_slice(&inner);
    extra.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    extra.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    assert_eq!(
        decode(&dcm.build(), &Limits::default()).unwrap().data,
        vec![3.0, 9.0]
    );
}

#[test]
fn dicom_errors_never_carry_file_content() {
    let mut dcm = SynthDicom::new(4, 4, ramp(16, 100));
    dcm.patient_name = Some("DOE^SECRETNAME");
    let file = dcm.build();
    assert!(decode(&file, &Limits::default()).is_ok());
    // Every truncation point and a sweep of single-byte corruptions: whatever breaks,
    // no error may echo the file, and nothing may panic out of `decode`.
    let mut variants: Vec<Vec<u8>> = (0..file.len()).map(|cut| file[..cut].to_vec()).collect();
    for at in (DICOM_PREAMBLE_LEN..file.len()).step_by(3) {
        let mut v = file.clone();
        v[at] ^= 0xA5;
        variants.push(v);
    }
    for bytes in &variants {
        if let Err(e) = decode(bytes, &Limits::default()) {
            let text = format!("{e} {e:?}");
            assert!(
                !text.contains("SECRET") && !text.contains("DOE"),
                "leaked: {text}"
            );
        }
    }
}

#[test]
fn jpeg_frame_header_is_found() {
    let jpeg = encode_jpeg(40, 24, ExtendedColorType::L8, &gradient8(40, 24));
    assert_eq!(
        jpeg_frame_header(&jpeg),
        Some(JpegFrameHeader {
            width: 40,
            height: 24,
            components: 1
        })
    );
    assert_eq!(jpeg_frame_header(&jpeg[..20]), None);
    assert_eq!(jpeg_frame_header(b"\xFF\xD8\xFF\xD9"), None);
    assert_eq!(jpeg_frame_header(b"not a jpeg"), None);
}

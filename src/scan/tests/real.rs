//! The real radiographs in `../shared/data` (skipped, visibly, when absent).

use std::io::Cursor;

use image::codecs::png::PngDecoder;
use image::DynamicImage;
use image::ImageDecoder;

use super::*;

// ---- real data ------------------------------------------------------------------------------

fn cxr_pngs(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for class in ["effusion", "nofinding"] {
        for entry in std::fs::read_dir(dir.join("cxr").join(class)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "png") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn real_cxr_pngs_preprocess_to_unit_range() {
    let Some(dir) = require_data("real_cxr_pngs_preprocess_to_unit_range") else {
        return;
    };
    let files = cxr_pngs(&dir);
    assert_eq!(
        files.len(),
        110,
        "expected 50 effusion + 60 no-finding PNGs"
    );
    let started = Instant::now();
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let out = load_scan(&bytes, &Limits::default(), 256)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(out.len(), 256 * 256);
        assert_eq!(min_max(&out), (0.0, 1.0), "{}", path.display());
    }
    eprintln!(
        "decode+preprocess of {} 1024x1024 PNGs: {:?} per image (test profile)",
        files.len(),
        started.elapsed() / files.len() as u32
    );
}

#[test]
fn real_rgba_pngs_match_their_gray_content() {
    let Some(dir) = require_data("real_rgba_pngs_match_their_gray_content") else {
        return;
    };
    for name in ["effusion/00000100_000.png", "nofinding/00004934_000.png"] {
        let bytes = std::fs::read(dir.join("cxr").join(name)).unwrap();
        let decoder = PngDecoder::new(Cursor::new(&bytes[..])).unwrap();
        assert_eq!(
            decoder.color_type(),
            image::ColorType::Rgba8,
            "{name} is the RGBA sample"
        );
        let rgba = DynamicImage::from_decoder(decoder).unwrap().into_rgba8();
        let img = decode(&bytes, &Limits::default()).unwrap();
        assert_eq!((img.width, img.height), (1024, 1024));
        // Channels are equal, so luminance must reproduce the red channel.
        for (v, p) in img.data.iter().zip(rgba.pixels()).step_by(997) {
            assert!((v - f32::from(p.0[0])).abs() < 1e-3, "{name}");
        }
        let out = preprocess(&img, 256).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0));
    }
}

/// Mean of the lung fields minus mean of the mediastinum strip on a preprocessed image:
/// central rows, outer thirds (minus a margin for collimation) vs the central tenth.
/// Negative in display polarity (lungs dark, spine and heart bright).
fn lung_minus_mediastinum(img: &[f32], size: usize) -> f32 {
    let rows = size * 3 / 10..size * 6 / 10;
    let at = |r: usize, c: usize| img[r * size + c];
    let lungs = rows.clone().flat_map(|r| {
        (size / 8..size / 3)
            .chain(size * 2 / 3..size * 7 / 8)
            .map(move |c| at(r, c))
    });
    let mediastinum = rows.flat_map(|r| (size * 9 / 20..size * 11 / 20).map(move |c| at(r, c)));
    mean(lungs) - mean(mediastinum)
}

fn load_real_dicom(dir: &std::path::Path, name: &str) -> GrayImage {
    let bytes = std::fs::read(dir.join("dicom").join(name)).unwrap();
    assert_eq!(detect_format(&bytes), Some(ImageFormat::Dicom), "{name}");
    decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn real_dicoms_decode() {
    let Some(dir) = require_data("real_dicoms_decode") else {
        return;
    };
    for (name, width, height) in [
        ("cr-chest-mono1-10bit.dcm", 440, 440),
        ("dx-chest-mono2-8bit-nofinding.dcm", 1024, 1024),
        ("cr-chest-mono2-8bit-jpegbaseline.dcm", 1024, 1024),
        ("cr-hip-mono2-10bit-jpeglossless.dcm", 1760, 2140),
    ] {
        let started = Instant::now();
        let img = load_real_dicom(&dir, name);
        assert_eq!((img.width, img.height), (width, height), "{name}");
        let out = preprocess(&img, 256).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0), "{name}");
        eprintln!(
            "{name}: decode+preprocess {:?} (test profile)",
            started.elapsed()
        );
    }
}

#[test]
fn real_monochrome1_has_monochrome2_polarity() {
    let Some(dir) = require_data("real_monochrome1_has_monochrome2_polarity") else {
        return;
    };
    for name in [
        "cr-chest-mono1-10bit.dcm",
        "dx-chest-mono2-8bit-nofinding.dcm",
        "cr-chest-mono2-8bit-jpegbaseline.dcm",
    ] {
        let out = preprocess(&load_real_dicom(&dir, name), 256).unwrap();
        let contrast = lung_minus_mediastinum(&out, 256);
        eprintln!("{name}: lung - mediastinum = {contrast:.3}");
        assert!(
            contrast < -0.05,
            "{name}: lungs must be darker than the mediastinum ({contrast})"
        );
    }
}

#[test]
fn real_dicom_truncations_fail_cleanly() {
    let Some(dir) = require_data("real_dicom_truncations_fail_cleanly") else {
        return;
    };
    for name in [
        "cr-chest-mono1-10bit.dcm",
        "cr-chest-mono2-8bit-jpegbaseline.dcm",
    ] {
        let bytes = std::fs::read(dir.join("dicom").join(name)).unwrap();
        for cut in [
            133,
            200,
            400,
            800,
            1500,
            bytes.len() / 3,
            bytes.len() - 100,
            bytes.len() - 1,
        ] {
            if let Err(e) = decode(&bytes[..cut], &Limits::default()) {
                assert!(
                    matches!(e.code(), "corrupt_image" | "unsupported_dicom"),
                    "{name}@{cut}: {e}"
                );
            }
        }
    }
}

/// Median timings of the serving path on a real 1024² PNG. Meaningful only in an
/// optimised build: `CARGO_PROFILE_TEST_OPT_LEVEL=3 cargo test ... -- --ignored`.
#[test]
#[ignore = "timing report, run in an optimised build"]
fn timing_real_png() {
    let Some(dir) = require_data("timing_real_png") else {
        return;
    };
    let bytes = std::fs::read(cxr_pngs(&dir)[0].clone()).unwrap();
    let median = |f: &mut dyn FnMut()| {
        let mut times: Vec<_> = (0..25)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let img = decode(&bytes, &Limits::default()).unwrap();
    let d = median(&mut || drop(decode(&bytes, &Limits::default()).unwrap()));
    let p = median(&mut || drop(preprocess(&img, 256).unwrap()));
    let l = median(&mut || drop(load_scan(&bytes, &Limits::default(), 256).unwrap()));
    eprintln!("1024² PNG: decode {d:?}, preprocess to 256² {p:?}, load_scan {l:?}");
    let dcm = std::fs::read(dir.join("dicom/dx-chest-mono2-8bit-nofinding.dcm")).unwrap();
    let t = median(&mut || drop(load_scan(&dcm, &Limits::default(), 256).unwrap()));
    eprintln!("1024² DICOM (implicit LE): load_scan {t:?}");
    let jpg = std::fs::read(dir.join("dicom/cr-chest-mono2-8bit-jpegbaseline.dcm")).unwrap();
    let t = median(&mut || drop(load_scan(&jpg, &Limits::default(), 256).unwrap()));
    eprintln!("1024² DICOM (JPEG baseline): load_scan {t:?}");
}

/// Writes preprocessed real scans to /tmp for eyeballing; `cargo test -- --ignored`.
#[test]
#[ignore = "writes images to /tmp for manual inspection"]
fn dump_preprocessed_for_inspection() {
    let Some(dir) = require_data("dump_preprocessed_for_inspection") else {
        return;
    };
    for entry in std::fs::read_dir(dir.join("dicom")).unwrap() {
        let path = entry.unwrap().path();
        let out = load_scan(&std::fs::read(&path).unwrap(), &Limits::default(), 256).unwrap();
        let bytes: Vec<u8> = out.iter().map(|v| (v * 255.0).round() as u8).collect();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        image::GrayImage::from_raw(256, 256, bytes)
            .unwrap()
            .save(format!("/tmp/pleura-{name}.png"))
            .unwrap();
    }
}

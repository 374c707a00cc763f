//! Image sets for `scoreguide metrics`: PNG folders (class folders as labels), arrays,
//! named errors for bad sets; and a whole metrics row on the FID Inception where its
//! weights are installed (required where `SCOREGUIDE_REQUIRE_DATA=1`, as in CI).

use candle_core::{Device, Tensor};
use scoreguide_experiments::image_metrics::{
    image_metrics, image_shape, read_images, FeatureNetwork, Images,
};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-image-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_png(path: &Path, side: u32, colour: png::ColorType, value: impl Fn(usize) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let per = match colour {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        _ => 4,
    };
    let data: Vec<u8> = (0..(side * side) as usize * per).map(value).collect();
    let mut enc = png::Encoder::new(std::fs::File::create(path).unwrap(), side, side);
    enc.set_color(colour);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(&data).unwrap();
}

#[test]
fn image_shapes_are_inferred_without_ambiguity() {
    assert_eq!(image_shape(784), Some((1, 28)));
    assert_eq!(image_shape(3072), Some((3, 32)));
    assert_eq!(image_shape(12), Some((3, 2)));
    assert_eq!(image_shape(10), None);
    assert_eq!(image_shape(0), None);
}

#[test]
fn png_folders_with_class_folders_are_labelled() {
    let dir = scratch("classes");
    for (class, n) in [("coat", 2), ("bag", 3)] {
        for i in 0..n {
            write_png(
                &dir.join(class).join(format!("{i}.png")),
                4,
                png::ColorType::Grayscale,
                |p| (p * 10 + i) as u8,
            );
        }
    }
    let set = read_images(dir.to_str().unwrap(), None).unwrap();
    assert_eq!((set.len(), set.channels, set.size), (5, 1, 4));
    // Named folders are numbered in sorted order: bag 0, coat 1 (files sorted by path).
    assert_eq!(set.labels.as_deref(), Some(&[0, 0, 0, 1, 1][..]));
    let first: Vec<f32> = set.rows.get(0).unwrap().to_vec1().unwrap();
    assert_eq!(first[1], 10.0 / 127.5 - 1.0);
    // The limit keeps the first images and their labels.
    let two = read_images(dir.to_str().unwrap(), Some(2)).unwrap();
    assert_eq!((two.len(), two.labels.unwrap().len()), (2, 2));

    // A loose image at the top: no labels.
    write_png(&dir.join("loose.png"), 4, png::ColorType::Grayscale, |_| 0);
    assert!(read_images(dir.to_str().unwrap(), None)
        .unwrap()
        .labels
        .is_none());
    // RGBA keeps RGB; a different shape is a named error.
    let rgb = scratch("rgb");
    write_png(&rgb.join("a.png"), 2, png::ColorType::Rgba, |p| p as u8);
    let set = read_images(rgb.to_str().unwrap(), None).unwrap();
    assert_eq!((set.channels, set.size), (3, 2));
    write_png(&rgb.join("b.png"), 3, png::ColorType::Rgb, |_| 0);
    let e = read_images(rgb.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.png") && e.contains("one shape"), "{e}");
    for d in [dir, rgb] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn bad_image_sources_are_named_errors() {
    let dir = scratch("bad");
    let e = read_images(dir.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no .png"), "{e}");
    let e = read_images("no/such/place", None).unwrap_err().to_string();
    assert!(
        e.contains("no/such/place") && e.contains("fashion-mnist"),
        "{e}"
    );
    let e = read_images("fashion-mnist:validation", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("train or test"), "{e}");
    let odd = dir.join("odd.safetensors");
    let t = Tensor::zeros((2, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images", t)]), &odd)
        .unwrap();
    let e = read_images(odd.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("odd.safetensors") && e.contains("10 values"),
        "{e}"
    );
    let nan = dir.join("nan.safetensors");
    let mut v = vec![0f32; 8];
    v[5] = f32::NAN;
    let t = Tensor::from_vec(v, (2, 4), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images", t)]), &nan)
        .unwrap();
    let e = read_images(nan.to_str().unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 1") && e.contains("NaN"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn blobs(n: usize, shift: f32, labels: bool) -> Images {
    let v: Vec<f32> = (0..n * 3 * 8 * 8)
        .map(|i| (((i * 7919 + n) % 97) as f32 / 48.5 - 1.0 + shift).clamp(-1.0, 1.0))
        .collect();
    Images {
        rows: Tensor::from_vec(v, (n, 3 * 8 * 8), &Device::Cpu).unwrap(),
        channels: 3,
        size: 8,
        labels: labels.then(|| (0..n as u32).map(|i| i % 2).collect()),
        name: format!("blobs{shift}"),
    }
}

#[test]
fn a_metrics_row_on_the_inception_features() {
    let net = match scoreguide_inception::FidInception::from_cache(&Device::Cpu) {
        Ok(net) => net,
        Err(e) if std::env::var("SCOREGUIDE_REQUIRE_DATA").is_ok_and(|v| v == "1") => {
            panic!("SCOREGUIDE_REQUIRE_DATA=1 but {e}")
        }
        Err(e) => return eprintln!("skipped: {e}"),
    };
    let network = FeatureNetwork::Inception(net);
    let (real, same, far) = (
        blobs(8, 0.0, true),
        blobs(8, 0.0, true),
        blobs(8, 0.6, true),
    );
    let m = image_metrics(&real, &same, &network, 3, None, 8, None).unwrap();
    assert!(m.fid.abs() < 1e-3, "identical sets: FID {}", m.fid);
    assert_eq!((m.precision, m.recall, m.coverage), (1.0, 1.0, 1.0));
    assert!(m.cw_precision.is_some() && m.is.is_none());
    assert!(m.features.contains("Inception"));
    let shifted = image_metrics(&real, &far, &network, 3, None, 8, None).unwrap();
    assert!(shifted.fid > 1.0, "a brighter set: FID {}", shifted.fid);
    let unlabelled = blobs(8, 0.0, false);
    let m = image_metrics(&real, &unlabelled, &network, 3, None, 8, None).unwrap();
    assert!(m.cw_precision.is_none());
    let e = image_metrics(&real, &blobs(3, 0.0, true), &network, 3, None, 8, None).unwrap_err();
    assert!(e.to_string().contains("k = 3"), "{e}");
}

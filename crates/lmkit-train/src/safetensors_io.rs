//! Writing f32 tensors as a `.safetensors` file with the `{"format": "pt"}` metadata that
//! transformers expects (header: u64 length + JSON of dtype/shape/offsets; then the raw data).

use candle_core::{DType, Storage, Tensor};
use std::io::Write;

pub fn write_safetensors(
    tensors: &[(String, Tensor)],
    w: &mut impl Write,
) -> candle_core::Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let bytes = t.elem_count() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.dims(), "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' '); // the data must start 8-byte aligned
    }
    let io = |e: std::io::Error| candle_core::Error::Msg(e.to_string());
    w.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&json).map_err(io)?;
    // Each tensor's values go out in blocks through one small buffer, read in place where the
    // tensor is a contiguous f32 one on the CPU: no copy of the whole set is held (a checkpoint
    // with its optimizer state is 4 × the model).
    let mut buf = Vec::with_capacity(BLOCK * 4);
    let mut put = |values: &[f32]| -> candle_core::Result<()> {
        for block in values.chunks(BLOCK) {
            buf.clear();
            buf.extend(block.iter().flat_map(|x| x.to_le_bytes()));
            w.write_all(&buf).map_err(io)?;
        }
        Ok(())
    };
    for (_, t) in sorted {
        with_f32_values(t, &mut put)?;
    }
    Ok(())
}

/// `f` of `t`'s values as f32 in row-major order: read in place where `t` is a contiguous f32
/// tensor on the CPU, else from a converted copy.
pub(crate) fn with_f32_values<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.to_dtype(DType::F32)?;
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        return f(&cpu.as_slice::<f32>()?[start..end]);
    }
    drop(storage);
    f(&t.flatten_all()?.to_vec1::<f32>()?)
}

/// Values converted and written at a time.
const BLOCK: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn written_tensors_read_back_equal_whatever_their_layout_and_dtype() {
        let dev = Device::Cpu;
        let n = BLOCK + 37; // more than one block
        let long =
            Tensor::from_vec((0..n).map(|i| i as f32 * 0.5 - 3.0).collect(), n, &dev).unwrap();
        let square = Tensor::from_vec((0..12).map(|i| i as f32).collect(), (3, 4), &dev).unwrap();
        let tensors = vec![
            ("z.long".to_string(), long.clone()),
            ("a.transposed".to_string(), square.t().unwrap()),
            ("m.columns".to_string(), square.narrow(1, 1, 2).unwrap()),
            ("r.rows".to_string(), square.narrow(0, 1, 2).unwrap()),
            ("b.f64".to_string(), square.to_dtype(DType::F64).unwrap()),
        ];
        let mut bytes = Vec::new();
        write_safetensors(&tensors, &mut bytes).unwrap();
        let back = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
        assert_eq!(back.len(), tensors.len());
        for (name, t) in &tensors {
            let want: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = &back[name];
            assert_eq!(got.dims(), t.dims(), "{name}");
            assert_eq!(got.dtype(), DType::F32, "{name}");
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want,
                "{name}"
            );
        }
    }
}

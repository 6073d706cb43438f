//! Writing f32 tensors as a `.safetensors` file with the `{"format": "pt"}` metadata that
//! transformers expects (header: u64 length + JSON of dtype/shape/offsets; then the raw data).

use candle_core::{DType, Tensor};
use std::io::Write;

pub fn write_safetensors(
    tensors: &[(String, Tensor)],
    w: &mut impl Write,
) -> candle_core::Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut datas = Vec::with_capacity(sorted.len());
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let data: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes = data.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.dims(), "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
        datas.push(data);
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
    for d in datas {
        for x in d {
            w.write_all(&x.to_le_bytes()).map_err(io)?;
        }
    }
    Ok(())
}

//! `--device` and `--dtype`: where a command's language model runs and in which type.

use anyhow::Result;
use lmkit_models::{DType, Device};

#[derive(clap::Args, Debug, Clone)]
pub struct Placement {
    /// Where to run the model: cpu, cuda or cuda:N (cuda needs a build with --features cuda)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The model's type: f32, or bf16/f16 for half the memory (Hugging Face directories; on the
    /// CPU a half type saves memory, and bf16 reads prompts faster where the CPU has AMX tiles)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl Placement {
    pub fn device(&self) -> Result<Device> {
        Ok(lmkit_models::parse_device(&self.device)?)
    }

    pub fn dtype(&self) -> Result<DType> {
        Ok(lmkit_models::parse_dtype(&self.dtype)?)
    }
}

//! The `scoreguide` command.

use clap::{Parser, Subcommand};
use scoreguide::train::Checkpoint;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scoreguide",
    version,
    about = "Score-based generative modelling with guidance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's self-describing metadata and its tensors.
    Info {
        /// A scoreguide checkpoint (.safetensors).
        checkpoint: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { checkpoint } => info(&checkpoint),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn info(path: &std::path::Path) -> candle_core::Result<()> {
    let c = Checkpoint::load(path)?;
    println!("{}", path.display());
    for (k, v) in &c.metadata {
        println!("  {k}: {v}");
    }
    let mut sections: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (name, t) in &c.tensors {
        let section = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name);
        let section = section
            .split('.')
            .take_while(|p| *p != "block0" && *p != "block1")
            .collect::<Vec<_>>();
        let key = section.first().map(|s| s.to_string()).unwrap_or_default();
        let key = if key == "adam" {
            section[..2.min(section.len())].join(".")
        } else {
            key
        };
        let e = sections.entry(key).or_default();
        e.0 += 1;
        e.1 += t.elem_count();
    }
    for (s, (n, p)) in sections {
        println!("  tensors {s}.*: {n} tensors, {p} values");
    }
    Ok(())
}

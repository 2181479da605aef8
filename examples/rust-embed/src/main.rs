//! rust-embed: generates tokens with the model compiled in by kiln-build.
//!
//!   rust-embed --prompt-ids 6403,1980,253 [-n 20] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//!              [--threads N] [--ignore-eos] [--text]
//!
//! Prints the generated ids on one line, or with --text the generated text; like `kiln run`, stops at the
//! end-of-sequence token (not printed) unless --ignore-eos is given.

include!(concat!(env!("OUT_DIR"), "/kiln_model.rs"));

use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rust-embed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (mut prompt, mut n, mut threads) = (Vec::new(), 20usize, 0u32);
    let (mut temperature, mut top_k, mut top_p, mut seed) = (0.0f32, 0u32, 1.0f32, 0u64);
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let ignore_eos = args.iter().any(|a| a == "--ignore-eos");
    let text = args.iter().any(|a| a == "--text");
    args.retain(|a| a != "--ignore-eos" && a != "--text");
    for pair in args.chunks(2) {
        let [flag, value] = pair else { return Err(format!("{} needs a value", pair[0]).into()) };
        match flag.as_str() {
            "--prompt-ids" => prompt = value.split(',').map(str::parse).collect::<Result<Vec<u32>, _>>()?,
            "-n" => n = value.parse()?,
            "--threads" => threads = value.parse()?,
            "--temperature" => temperature = value.parse()?,
            "--top-k" => top_k = value.parse()?,
            "--top-p" => top_p = value.parse()?,
            "--seed" => seed = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if prompt.is_empty() {
        return Err("give --prompt-ids as comma-separated token ids".into());
    }
    let mut model = kiln_model::Model::new(threads)?;
    let mut sampler = kiln_model::Sampler::new(temperature, top_k, top_p, seed)?;
    let eos = if ignore_eos { None } else { model.eos_token() };
    model.prefill(&prompt)?;
    let mut out = Vec::new();
    let mut bytes = Vec::new();
    while out.len() < n {
        let t = sampler.sample(&mut model)?;
        if Some(t) == eos {
            break;
        }
        if text {
            bytes.extend_from_slice(model.token_bytes(t)?);
        }
        out.push(t.to_string());
        if out.len() == n || model.position() >= model.context_length() {
            break;
        }
        model.decode(t)?;
    }
    if text {
        use std::io::Write;
        std::io::stdout().write_all(&bytes)?;
    } else {
        println!("{}", out.join(" "));
    }
    Ok(())
}

//! The default model's tokenizer (built from GGUF metadata) against known ids, round trips and its chat
//! template.

use crate::common::smollm2;
use kiln::frontend::tokenizer::ChatMessage;

#[test]
fn encodes_the_reference_prompt() {
    let tok = smollm2().tokenizer.as_ref().expect("tokenizer");
    assert_eq!(tok.encode("Once upon a time", false).unwrap(), [6403, 1980, 253, 655]);
    assert_eq!(tok.decode(&[6403, 1980, 253, 655], false).unwrap(), "Once upon a time");
    // Ids recorded by another SmolLM2 implementation's tokenizer tests (not produced by Kiln).
    let known: [(&str, &[u32]); 7] = [
        ("Hello, we can use", &[19556, 28, 392, 416, 722]),
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
        ("Café déjà vu.", &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
        ("  multiple   spaces", &[216, 2701, 256, 5600]),
        ("\n", &[198]),
        ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
    ];
    for (text, ids) in known {
        assert_eq!(tok.encode(text, false).unwrap(), ids, "{text:?}");
    }
    // SmolLM2's pre-tokenizer splits digits one by one.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    assert_eq!(tok.decode(&digits, false).unwrap(), "12345");
}

#[test]
fn round_trips_varied_text() {
    let tok = smollm2().tokenizer.as_ref().unwrap();
    let samples = [
        "Hello, world!",
        "  leading spaces and\ttabs\t\tand   runs     of spaces  ",
        "line one\nline two\r\n\n\nthree blank lines",
        "unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어",
        "emoji 🦀🔥👩‍💻 and symbols ∀x∈ℝ: x² ≥ 0 — ‘quotes’ «guillemets»",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{v:?}\");\n}",
        "def f(x):\n\treturn x ** 2  # comment\n",
        "numbers 3.14159, 1e-5, 0xDEADBEEF, 2026-11-25",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ];
    for s in samples {
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s, "round trip of {s:?} via {ids:?}");
        // Streaming decode yields the same text piece by piece.
        let mut d = tok.stream_decoder(false);
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(p) = d.push(id).unwrap() {
                streamed.push_str(&p);
            }
        }
        if let Some(rest) = d.finish() {
            streamed.push_str(&rest);
        }
        assert_eq!(streamed, s);
    }
    // Special tokens written in text are single ids.
    let ids = tok.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
}

#[test]
fn chat_template_renders_chatml() {
    let tok = smollm2().tokenizer.as_ref().unwrap();
    let text = tok.apply_chat_template(&[ChatMessage::user("What is 2+2?")], true).unwrap();
    assert!(text.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), text.matches("<|im_start|>").count());
}

#[test]
fn token_bytes_concatenate_to_the_decoded_text() {
    // What embedded programs use to print text (kiln_model_token_bytes): per-token bytes, control tokens
    // empty, whose concatenation must be decode(.., skip_special = true), also across split characters.
    let tok = smollm2().tokenizer.as_ref().unwrap();
    let text = "<|im_start|>user\nCafé 日本語 🦀 x² ≥ 0<|im_end|>\n";
    let ids = tok.encode(text, false).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).expect("GGUF tokens have bytes")).collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), tok.decode(&ids, true).unwrap());
    assert_eq!(tok.token_bytes(2), Some(Vec::new()), "EOS is a control token");
    assert_eq!(tok.token_bytes(tok.vocab_size() as u32), None);
}

//! Shared by the benches: a smoke run or a measuring one, which parts to
//! run (`pipeline`, `dlq`), and how large.

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs a bench
/// binary without it, and then only a small smoke run of its fast parts.
pub struct Select {
    /// A smoke run (no `--bench`).
    pub smoke: bool,
    ids: Vec<String>,
    smoke_ids: &'static [&'static str],
}

impl Select {
    /// From the command line: the part ids named (none = all), or in a
    /// smoke run `smoke_ids`.
    pub fn from_args(smoke_ids: &'static [&'static str]) -> Select {
        let all: Vec<String> = std::env::args().skip(1).collect();
        Select {
            smoke: !all.iter().any(|a| a == "--bench"),
            ids: all.into_iter().filter(|a| !a.starts_with('-')).collect(),
            smoke_ids,
        }
    }

    /// How many (jobs, calls, posts) a run takes: `smoke_n` in a smoke run,
    /// else `$var` if set, else `full_n`. (Each bench compiles this file
    /// as a module of its own; not every bench sizes its run here.)
    #[allow(dead_code)]
    pub fn count(&self, var: &str, smoke_n: usize, full_n: usize) -> usize {
        if self.smoke {
            return smoke_n;
        }
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(full_n)
    }

    /// Whether part `id` runs.
    pub fn want(&self, id: &str) -> bool {
        if self.smoke {
            self.smoke_ids.contains(&id)
        } else {
            self.ids.is_empty() || self.ids.iter().any(|a| a == id)
        }
    }
}

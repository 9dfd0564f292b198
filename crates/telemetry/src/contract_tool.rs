//! `telemetry contract ...`: check, show, export and try out a payload contract.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use telemetry_core::{Outcome, Validator};

/// Operator tools for the payload contract.
#[derive(Debug, clap::Args)]
pub struct ContractArgs {
    /// The contract file (TOML, or JSON Schema when it ends in `.json`); the built-in one if unset.
    #[arg(long, env = "TELEMETRY_CONTRACT", global = true)]
    contract: Option<PathBuf>,

    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Loads and checks the contract; exits non-zero, naming the setting, when it is wrong.
    Check,
    /// Prints the contract as TOML, as the audit service will apply it.
    Show,
    /// Prints the contract as a JSON Schema (draft 2020-12) for device teams' own tooling.
    JsonSchema,
    /// Validates payloads, one JSON document per line on standard input, as the audit service
    /// would now; prints one line per payload: `accepted <normalized event>` or
    /// `rejected <code> <message>`.
    Validate,
}

/// Runs one contract action.
pub fn run(args: ContractArgs) -> anyhow::Result<()> {
    let contract = telemetry_audit::load_contract(args.contract.as_deref())
        .context("the contract does not load")?;
    let mut out = std::io::stdout().lock();
    match args.action {
        Action::Check => {
            writeln!(
                out,
                "Contract version {} is valid: {} declared metrics, unknown fields {:?}.",
                contract.version,
                contract.metrics.len(),
                contract.unknown_fields
            )?;
        }
        Action::Show => write!(out, "{}", contract.to_toml())?,
        Action::JsonSchema => {
            serde_json::to_writer_pretty(&mut out, &contract.to_json_schema())?;
            writeln!(out)?;
        }
        Action::Validate => {
            let validator = Validator::new(contract)?;
            let now = chrono::Utc::now().timestamp_millis();
            for line in std::io::stdin().lock().lines() {
                let line = line.context("cannot read standard input")?;
                if line.trim().is_empty() {
                    continue;
                }
                match validator.validate(line.as_bytes(), now) {
                    Outcome::Accepted(event) => {
                        writeln!(out, "accepted {}", serde_json::to_string(&event)?)?;
                    }
                    Outcome::Rejected(rejection) => {
                        writeln!(out, "rejected {} {rejection}", rejection.code())?;
                    }
                }
            }
        }
    }
    Ok(())
}

//! `server`: parse the command line, set up logging, dispatch. All logic lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // `LORASERVE_LOG`: a `tracing` filter (`warn`, `debug`, `info,loraserve::engine=debug`); `info` when unset.
    // A filter that does not parse is an error, not the default in silence.
    let filter = match std::env::var("LORASERVE_LOG") {
        Ok(v) => match tracing_subscriber::EnvFilter::try_new(&v) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: LORASERVE_LOG={v:?}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        Err(std::env::VarError::NotUnicode(v)) => {
            eprintln!("error: LORASERVE_LOG={v:?}: not UTF-8");
            return std::process::ExitCode::FAILURE;
        }
        Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new("info"),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour for a terminal only: `kubectl logs`, `docker logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
    let cli = loraserve::cli::Cli::parse();
    match loraserve::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Output piped into a reader that stopped early (`server client list | head -1`): done, as other
        // Unix tools.
        Err(e) if e.chain().any(|c| c.is::<loraserve::cli::StdoutClosed>()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A gRPC status from `server client`: show its code name and message.
            // With the request id the server logged the call under, when it sent one (Generate).
            if let Some(s) = e.downcast_ref::<tonic::Status>() {
                // tonic reports a `--deadline` that passed on the client's side first as CANCELLED "Timeout
                // expired"; gRPC calls it DEADLINE_EXCEEDED, as the server's own answer is.
                if s.code() == tonic::Code::Cancelled && s.message() == tonic::TimeoutExpired(()).to_string() {
                    eprintln!("error: DEADLINE_EXCEEDED: the call's --deadline passed before the server answered");
                    return std::process::ExitCode::FAILURE;
                }
                let code = loraserve::server::status::code_label(s.code());
                match loraserve::server::request_log::id_in(s.metadata()) {
                    Some(id) => eprintln!("error: {code}: {} (request id {id})", s.message()),
                    None => eprintln!("error: {code}: {}", s.message()),
                }
                return std::process::ExitCode::FAILURE;
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

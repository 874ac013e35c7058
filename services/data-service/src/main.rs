use std::process::ExitCode;

const USAGE: &str = "usage: data-service [serve | migrate | healthcheck]
  serve        run the items API (the default)
  migrate      apply pending database migrations, then exit
  healthcheck  exit 0 if the running service answers GET /health with 200, else 1";

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    let outcome = match command.as_deref() {
        None | Some("serve") => run(data_service::serve()),
        Some("migrate") => run(data_service::migrate()),
        Some("healthcheck") => {
            let server = data_service::configuration::load().map(|loaded| loaded.settings.server);
            return observability::healthcheck::run(data_service::SERVICE_NAME, server);
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("data-service: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("data-service: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    command: impl Future<Output = Result<(), Box<dyn std::error::Error>>>,
) -> Result<(), Box<dyn std::error::Error>> {
    actix_web::rt::System::new().block_on(command)
}

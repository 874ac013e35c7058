//! A log writer that batches lines: request threads append to a shared buffer, and one
//! background thread writes it out a few milliseconds after the first line of a batch
//! arrives (sooner when the batch is large).
//!
//! A writer thread fed line by line (tracing-appender's) makes one `write` per line and
//! wakes up once per line; under load that cost more CPU than formatting the lines. Here a
//! line costs a short mutex hold and a copy, and a whole batch one `write`.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a batch may collect lines before it is written.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// A batch this large is written at once.
const BATCH_BYTES: usize = 64 * 1024;
/// Writers wait (lines are never dropped) while this much is queued, e.g. behind a stalled pipe.
const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

struct Queue {
    bytes: Vec<u8>,
    closed: bool,
    /// The background thread is parked until a line arrives. Only then does a writer signal
    /// it: under steady logging it is already timing the next batch, and a needless signal
    /// is a system call on the request's thread.
    writer_parked: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line arrives for the parked thread, when a batch grows past
    /// [`BATCH_BYTES`], or when the writer closes.
    batch_ready: Condvar,
    /// Signalled when the background thread has taken the queued bytes.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The [`MakeWriter`] handed to the log formatter; cheap to clone.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Stops the background thread after it has written everything queued.
pub struct BatchedWriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    /// Starts the background thread writing to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(Self, BatchedWriterGuard)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { bytes: Vec::with_capacity(BATCH_BYTES), closed: false, writer_parked: false }),
            batch_ready: Condvar::new(),
            drained: Condvar::new(),
        });
        let thread = std::thread::Builder::new().name("log-writer".to_owned()).spawn({
            let shared = shared.clone();
            move || write_batches(&shared, out)
        })?;
        Ok((Self { shared: shared.clone() }, BatchedWriterGuard { shared, thread: Some(thread) }))
    }
}

fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut reported_error = false;
    loop {
        let mut queue = shared.lock();
        while queue.bytes.is_empty() && !queue.closed {
            queue.writer_parked = true;
            queue = shared.batch_ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
        queue.writer_parked = false;
        if !queue.closed && queue.bytes.len() < BATCH_BYTES {
            queue = shared.batch_ready.wait_timeout(queue, BATCH_WINDOW).unwrap_or_else(PoisonError::into_inner).0;
        }
        std::mem::swap(&mut queue.bytes, &mut batch);
        let closed = queue.closed;
        drop(queue);
        shared.drained.notify_all();
        if let Err(error) = out.write_all(&batch).and_then(|()| out.flush())
            && !reported_error
        {
            // Nowhere else to say it; once is enough.
            eprintln!("log writer: cannot write logs: {error}");
            reported_error = true;
        }
        batch.clear();
        if closed {
            return;
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut queue = self.shared.lock();
        while queue.bytes.len() >= MAX_QUEUED_BYTES && !queue.closed {
            queue = self.shared.drained.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
        let wakes_writer = std::mem::take(&mut queue.writer_parked);
        queue.bytes.extend_from_slice(bytes);
        let large = queue.bytes.len() >= BATCH_BYTES && queue.bytes.len() - bytes.len() < BATCH_BYTES;
        drop(queue);
        if wakes_writer || large {
            self.shared.batch_ready.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for BatchedWriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.batch_ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_by_the_time_the_guard_drops() {
        let sink = Sink::default();
        let (writer, guard) = BatchedWriter::spawn(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        // One write per line, as the formatter does.
                        writer.make_writer().write_all(format!("thread {t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let written = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let own: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("thread {t} "))).collect();
            let expected: Vec<String> = (0..5_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(own, expected, "thread {t}'s lines are all there, in order");
        }
    }

    /// Hands each written batch over a channel, so a test can wait for it.
    struct Announcing(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Announcing {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_logged_while_the_writer_is_parked_wakes_it() {
        let (sender, batches) = std::sync::mpsc::channel();
        let (writer, _guard) = BatchedWriter::spawn(Announcing(sender)).unwrap();
        for line in ["first\n", "second\n"] {
            // Parked or not when the line arrives, the thread writes it without a flush.
            writer.make_writer().write_all(line.as_bytes()).unwrap();
            let batch = batches.recv_timeout(Duration::from_secs(10)).expect("written without a flush");
            assert_eq!(batch, line.as_bytes());
        }
    }
}

//! A call's deadline, from its `grpc-timeout` header: the instants the server keeps it by, and how a call
//! that ended without an answer counts. tonic's transport enforces the header too, with a timer started just
//! before the call's [`Arrival`] stamp, answering CANCELLED "Timeout expired" when it fires; the server's own
//! instants come a little earlier, so that the client sees the accurate DEADLINE_EXCEEDED (and the engine
//! frees the request) first:
//!
//! - the handler's deadline ([`CallDeadline::handler`]): the timeout less a margin of a twentieth, at most
//!   50 ms, which the handlers keep while they wait (adapter, queue, compile, generation);
//! - the answer's ([`CallDeadline::answer_by`]): half that margin, at which `counting.rs` answers a call whose
//!   handler has not (its request message has not even arrived) with DEADLINE_EXCEEDED itself.

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use tonic::codegen::http::HeaderMap;
use tonic::Status;

use super::arrival::Arrival;
use super::status::invalid;

/// A call's `grpc-timeout`, counted from its arrival.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadline {
    arrival: Instant,
    timeout: Duration,
}

impl CallDeadline {
    /// The deadline `headers` set (`grpc-timeout: <n><unit>`, unit one of H M S m u n) for a call that arrived
    /// at `arrival` (its [`Arrival`], when there is one): `None` without the header; a header out of the
    /// spec is INVALID_ARGUMENT naming it.
    pub fn of(headers: &HeaderMap, arrival: Option<&Arrival>) -> Result<Option<Self>, Status> {
        let Some(v) = headers.get("grpc-timeout") else { return Ok(None) };
        let v = v.to_str().map_err(|_| invalid("grpc-timeout", "not ASCII"))?;
        let (num, unit) = v.split_at(v.len().saturating_sub(1));
        // The gRPC wire spec: TimeoutValue is a positive integer of at most 8 digits.
        if num.len() > 8 {
            return Err(invalid("grpc-timeout", format!("`{v}` has more than 8 digits")));
        }
        let n: u64 = num.parse().map_err(|_| invalid("grpc-timeout", format!("`{v}` is not <number><unit>")))?;
        let timeout = match unit {
            "H" => Duration::from_secs(n.saturating_mul(3600)),
            "M" => Duration::from_secs(n.saturating_mul(60)),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return Err(invalid("grpc-timeout", format!("unknown unit in `{v}`"))),
        };
        Ok(Some(CallDeadline { arrival: arrival.map_or_else(Instant::now, |a| a.0), timeout }))
    }

    fn margin(&self) -> Duration {
        (self.timeout / 20).min(Duration::from_millis(50))
    }

    /// The deadline the handlers keep (see the module header). `None` past what an `Instant` holds
    /// (99999999H on some platforms): no deadline then.
    pub fn handler(&self) -> Option<Instant> {
        self.arrival.checked_add(self.timeout - self.margin())
    }

    /// When a call its handler has not answered is answered DEADLINE_EXCEEDED (see the module header).
    pub fn answer_by(&self) -> Option<Instant> {
        self.arrival.checked_add(self.timeout - self.margin() / 2)
    }

    /// From when a call the client leaves counts as ended by its deadline rather than cancelled: the last
    /// quarter of the time its handler has, at most its last 250 ms. The client's timer started before the
    /// request reached the handler (the network, the connection's queue), so on a busy server it fires before
    /// the handler's: with the handler's deadline alone, 3–7 % of the calls a loaded server saw end by their
    /// clients' deadlines counted CANCELLED. A client that cancels so close to its deadline counts as timed out.
    pub fn timed_out_from(&self) -> Option<Instant> {
        let handler = self.handler()?;
        let slack = (handler.saturating_duration_since(self.arrival) / 4).min(Duration::from_millis(250));
        Some(handler.checked_sub(slack).unwrap_or(handler))
    }
}

/// How a call the client left ended: by its deadline once `timed_out_from` has passed, else cancelled.
pub fn ended_by(timed_out_from: Option<Instant>) -> tonic::Code {
    if timed_out_from.is_some_and(|t| Instant::now() >= t) {
        tonic::Code::DeadlineExceeded
    } else {
        tonic::Code::Cancelled
    }
}

/// DEADLINE_EXCEEDED for a deadline already past (`0n`): a call whose work happens to need no wait (a
/// resident adapter, a short text) does not meet it either, as a generation never does.
pub fn not_past(deadline: Option<Instant>) -> Result<(), tonic::Status> {
    match deadline {
        Some(d) if Instant::now() >= d => Err(tonic::Status::deadline_exceeded("deadline exceeded")),
        _ => Ok(()),
    }
}

/// `fut`'s output, or `None` once `deadline` has passed. Unlike `tokio::time::timeout_at` this reads the clock
/// on every poll, not only when its timer fires: tonic enforces `grpc-timeout` with a timer of its own, polled
/// right after the service, and with the clock read here the earlier deadline (the server's, see the module
/// header) wins whatever order the timers are woken in.
pub async fn within<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    let timer = tokio::time::sleep_until(deadline.into());
    tokio::pin!(fut, timer);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if Instant::now() >= deadline || timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// `fut`'s output within the call's `deadline`: DEADLINE_EXCEEDED naming what it was `doing` once the
/// deadline has passed, also before it starts (`fut` is then never polled: a call may not act past its
/// deadline).
pub async fn by_deadline<F: Future>(deadline: Option<Instant>, doing: &str, fut: F) -> Result<F::Output, Status> {
    let exceeded = || Status::deadline_exceeded(format!("deadline exceeded {doing}"));
    match deadline {
        Some(d) if Instant::now() >= d => Err(exceeded()),
        Some(d) => within(d, fut).await.ok_or_else(exceeded),
        None => Ok(fut.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_past_refuses_a_deadline_already_past_only() {
        let now = Instant::now();
        let s = not_past(Some(now)).unwrap_err();
        assert_eq!((s.code(), s.message()), (tonic::Code::DeadlineExceeded, "deadline exceeded"));
        assert!(not_past(Some(now + Duration::from_secs(60))).is_ok());
        assert!(not_past(None).is_ok());
    }

    fn deadline(v: &str) -> Result<Option<CallDeadline>, Status> {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        CallDeadline::of(&h, None)
    }

    #[test]
    fn grpc_timeouts_parse_and_out_of_spec_ones_are_refused_not_panicked_on() {
        let now = Instant::now();
        let d = deadline("2S").unwrap().unwrap();
        let handler = d.handler().unwrap();
        assert!(handler > now + Duration::from_millis(1900) && handler < now + Duration::from_secs(3));
        assert!(d.handler() < d.answer_by() && d.answer_by() < Some(d.arrival + d.timeout));
        assert!(deadline("99999999H").is_ok(), "the largest value the spec allows");
        for bad in ["18446744073709551615S", "123456789m", "5x", "S", "-1S"] {
            let e = deadline(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("grpc-timeout"), "{bad}: {}", e.message());
        }
        assert!(CallDeadline::of(&HeaderMap::new(), None).unwrap().is_none());
    }

    /// A call left in the last quarter of its handler's time, or its last 250 ms, was ended by its deadline.
    #[test]
    fn calls_left_close_to_their_deadline_count_as_timed_out() {
        let arrival = Instant::now();
        // Margins: 100 ms / 20 = 5 ms, 10 s / 20 capped at 50 ms.
        let from = |timeout: Duration| CallDeadline { arrival, timeout }.timed_out_from().unwrap();
        assert_eq!(from(Duration::from_millis(100)), arrival + Duration::from_micros(95_000 * 3 / 4));
        assert_eq!(from(Duration::from_secs(10)), arrival + Duration::from_millis(9700));
        assert_eq!(ended_by(None), tonic::Code::Cancelled);
        assert_eq!(ended_by(Some(arrival)), tonic::Code::DeadlineExceeded);
        assert_eq!(ended_by(Some(Instant::now() + Duration::from_secs(60))), tonic::Code::Cancelled);
    }

    /// A deadline already past refuses the work before it starts; one that passes while it runs ends the
    /// call then, naming the work; without one, it runs to its end.
    #[tokio::test]
    async fn by_deadline_acts_only_before_the_deadline() {
        let ran = std::sync::atomic::AtomicBool::new(false);
        let run = async { ran.store(true, std::sync::atomic::Ordering::Relaxed) };
        let e = by_deadline(Some(Instant::now()), "unloading adapter `a`", run).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::DeadlineExceeded, "deadline exceeded unloading adapter `a`"));
        assert!(!ran.load(std::sync::atomic::Ordering::Relaxed), "acted past its deadline");
        let d = Instant::now() + Duration::from_millis(50);
        let e = by_deadline(Some(d), "listing adapters", std::future::pending::<()>()).await.unwrap_err();
        assert_eq!(e.message(), "deadline exceeded listing adapters");
        assert!(Instant::now() >= d);
        assert_eq!(by_deadline(None, "x", async { 3 }).await.unwrap(), 3);
    }
}

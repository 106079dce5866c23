//! gRPC message framing that does not copy large `bytes` fields.
//!
//! tonic's codec encodes every message into one contiguous buffer and, on
//! receipt, copies every HTTP/2 DATA frame into another before decoding. For
//! a produce request or a replica fetch answer that is one extra copy of
//! every record batch per hop, on top of the socket copies the kernel makes
//! anyway. On the calls that carry batches (`Producer/ProduceStream`,
//! replica fetch, `Consumer/Fetch`) the broker and the client frame
//! messages themselves:
//!
//! - [`encode`] writes a message as a list of chunks: its small fields are
//!   encoded into one buffer, and every `bytes` value of at least
//!   [`CHUNK_MIN`] bytes is its own chunk, shared with the message rather
//!   than copied. hyper sends each chunk as a DATA frame straight from that
//!   memory.
//! - [`Decoder`] collects received DATA frames and decodes a message from
//!   them without joining them: a `bytes` field that arrived as one frame
//!   (the common case, since the sender made it one chunk) is a slice of
//!   that frame. One that straddles frames is copied once, and so are
//!   frames under [`CHUNK_MIN`] bytes, which are joined as they arrive.
//! - [`EncodeBody`] and [`DecodeStream`] put the two on HTTP/2 bodies.
//!
//! The bytes on the wire are ordinary gRPC (length-prefixed protobuf,
//! compression flag 0), so any gRPC client or server interoperates with
//! these paths.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{buf::UninitSlice, Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::Status;

/// The gRPC message prefix: a compression flag and a big-endian length.
pub const PREFIX_LEN: usize = 5;

/// `bytes` values at least this long are sent as their own chunk instead of
/// being copied into the message's buffer.
pub const CHUNK_MIN: usize = 4096;

/// Encodes `msg` as one gRPC length-prefixed message, in chunks.
///
/// Concatenated, the chunks are exactly what tonic's codec would send.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<Bytes>, Status> {
    let len = msg.encoded_len();
    let len32 = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!("message of {len} bytes is too large for gRPC"))
    })?;
    let mut out = Chunks {
        done: Vec::new(),
        cur: BytesMut::with_capacity(PREFIX_LEN + len.min(512)),
    };
    out.cur.put_u8(0);
    out.cur.put_u32(len32);
    msg.encode(&mut out)
        .map_err(|e| Status::internal(format!("encoding a message: {e}")))?;
    if !out.cur.is_empty() {
        out.done.push(out.cur.freeze());
    }
    Ok(out.done)
}

/// A [`BufMut`] that keeps large [`Bytes`] values as chunks of their own.
///
/// prost writes a `bytes` field with `buf.put(value.clone())`; for a
/// `Bytes`, `copy_to_bytes` of the whole value is a reference-count bump,
/// not a copy.
struct Chunks {
    done: Vec<Bytes>,
    cur: BytesMut,
}

// SAFETY: every method delegates to `BytesMut`'s own implementation of the
// trait, whose contract it therefore keeps: `chunk_mut` returns `cur`'s
// spare capacity and `advance_mut` marks that many of those bytes written.
// `put` only ever appends whole, initialised chunks.
#[allow(unsafe_code)]
unsafe impl BufMut for Chunks {
    fn remaining_mut(&self) -> usize {
        self.cur.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of `chunk_mut()`, which
        // is `cur`'s spare capacity: `BytesMut::advance_mut`'s contract.
        unsafe { self.cur.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.cur.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        let n = src.remaining();
        if n >= CHUNK_MIN {
            if !self.cur.is_empty() {
                self.done.push(self.cur.split().freeze());
            }
            self.done.push(src.copy_to_bytes(n));
        } else {
            self.cur.put(src);
        }
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.cur.put_slice(src);
    }
}

/// Looks at a message's bytes (without its prefix) before they are
/// decoded; an `Err` refuses the message undecoded. For what decoding
/// could cost beyond the bytes' own size: a message of empty repeated
/// entries decodes to about fifty times its size.
pub type DecodeCheck = fn(&mut dyn Buf) -> Result<(), Status>;

/// Reassembles gRPC messages from received DATA frames.
#[derive(Debug)]
pub struct Decoder {
    /// Received bytes, in order: `frames`, then `small`.
    frames: Rope,
    /// Frames shorter than [`CHUNK_MIN`], copied together: a peer sending
    /// a message in tiny frames must not make the decoder keep a handle
    /// (and the frame's buffer) per frame, as it would for 64 MiB sent one
    /// byte at a time. Moved into `frames` when a message is complete.
    small: BytesMut,
    max: usize,
    check: Option<DecodeCheck>,
}

impl Decoder {
    /// A decoder refusing messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            frames: Rope::default(),
            small: BytesMut::new(),
            max,
            check: None,
        }
    }

    /// Runs `check` on every message before decoding it.
    pub fn with_check(mut self, check: DecodeCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.frames.remaining + self.small.len()
    }

    /// Adds one received frame.
    pub fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        if frame.len() < CHUNK_MIN {
            self.small.extend_from_slice(&frame);
        } else {
            self.flush_small();
            self.frames.push(frame);
        }
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.frames.push(self.small.split().freeze());
        }
    }

    /// The next whole message, or `None` until more frames arrive.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        let Some(len) = self.head_len()? else {
            return Ok(None);
        };
        if self.buffered() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.flush_small();
        self.frames.advance(PREFIX_LEN);
        let body = self.frames.split_to(len);
        if let Some(check) = self.check {
            check(&mut body.clone())?;
        }
        M::decode(body)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a message: {e}")))
    }

    /// The length the next message's prefix declares, once its prefix is
    /// here; an error for a compressed or oversized one.
    pub fn head_len(&self) -> Result<Option<usize>, Status> {
        if self.buffered() < PREFIX_LEN {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        let mut filled = 0;
        for f in self
            .frames
            .parts
            .iter()
            .map(|f| &f[..])
            .chain([&self.small[..]])
        {
            let n = f.len().min(PREFIX_LEN - filled);
            prefix[filled..filled + n].copy_from_slice(&f[..n]);
            filled += n;
            if filled == PREFIX_LEN {
                break;
            }
        }
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(
                    "compressed gRPC messages are not accepted on this stream",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "invalid gRPC compression flag {flag}"
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max {
            return Err(Status::out_of_range(format!(
                "message of {len} bytes exceeds the limit of {} bytes",
                self.max
            )));
        }
        Ok(Some(len))
    }
}

/// Consecutive frames read as one [`Buf`]; `copy_to_bytes` within one frame
/// is a slice of it.
#[derive(Clone, Debug, Default)]
struct Rope {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Rope {
    fn push(&mut self, frame: Bytes) {
        self.remaining += frame.len();
        self.parts.push_back(frame);
    }

    /// Removes the first `len` bytes, as a rope of their own.
    fn split_to(&mut self, len: usize) -> Rope {
        assert!(len <= self.remaining, "split_to past the end");
        let mut out = Rope::default();
        while out.remaining < len {
            let front = self.parts.front_mut().expect("within remaining");
            let need = len - out.remaining;
            if front.len() <= need {
                out.push(self.parts.pop_front().expect("front exists"));
            } else {
                out.push(front.split_to(need));
            }
        }
        self.remaining -= len;
        out
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map(|b| &b[..]).unwrap_or(&[])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a message");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("advance within remaining");
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.remaining,
            "copy_to_bytes past the end of a message"
        );
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.remaining -= len;
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

/// An HTTP/2 body sending a stream of messages with [`encode`].
///
/// A server's body ends with `grpc-status` trailers (an `Err` item ends the
/// call with that status); a client's request body just ends.
pub struct EncodeBody<S> {
    messages: S,
    pending: VecDeque<Bytes>,
    trailers: bool,
    done: bool,
}

impl<S> EncodeBody<S> {
    /// A client's request body.
    pub fn client(messages: S) -> Self {
        Self {
            messages,
            pending: VecDeque::new(),
            trailers: false,
            done: false,
        }
    }

    /// A server's response body, ending with `grpc-status` trailers.
    pub fn server(messages: S) -> Self {
        Self {
            trailers: true,
            ..Self::client(messages)
        }
    }

    fn finish(&mut self, status: Option<Status>) -> Option<Result<Frame<Bytes>, Status>> {
        self.done = true;
        if !self.trailers {
            return status.map(Err);
        }
        let status = status.unwrap_or_else(|| Status::ok(""));
        let mut headers = http::HeaderMap::new();
        match status.add_header(&mut headers) {
            Ok(()) => Some(Ok(Frame::trailers(headers))),
            Err(e) => Some(Err(e)),
        }
    }
}

/// A message's last chunk, keeping the message alive until it is dropped.
struct LastChunk<M>(Bytes, #[allow(dead_code)] M);

impl<M> AsRef<[u8]> for LastChunk<M> {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl<S, M> Body for EncodeBody<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: Message + 'static,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.messages).poll_next(cx)) {
                // The message lives until its last chunk is dropped (sent):
                // whatever its bytes carry (a broker's read budget, held
                // by the answer's values) is given back only then, not
                // when it is encoded, as small values are copied into the
                // encoded chunks and those may wait in hyper's and h2's
                // send queues for a slow reader.
                Some(Ok(msg)) => match encode(&msg) {
                    Ok(mut chunks) => {
                        if let Some(last) = chunks.pop() {
                            chunks.push(Bytes::from_owner(LastChunk(last, msg)));
                        }
                        this.pending.extend(chunks);
                    }
                    Err(status) => return Poll::Ready(this.finish(Some(status))),
                },
                Some(Err(status)) => return Poll::Ready(this.finish(Some(status))),
                None => return Poll::Ready(this.finish(None)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

/// The messages of a received HTTP/2 body, decoded with [`Decoder`].
///
/// A response whose trailers carry a failed `grpc-status` ends with that
/// status as an `Err` item; one that ends inside a message ends with an
/// `Err` too.
pub struct DecodeStream<B, M> {
    body: B,
    decoder: Decoder,
    done: bool,
    /// Bytes every stream sharing it may hold of messages not received
    /// whole yet (see [`DecodeStream::with_budget`]).
    budget: Option<PollSemaphore>,
    /// The share of the budget the message being received holds.
    held: Option<OwnedSemaphorePermit>,
    /// The longest wait for a share, and the running wait's timer.
    budget_wait_max: std::time::Duration,
    budget_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    _message: PhantomData<fn() -> M>,
}

/// Messages up to this long are received without a share of the budget:
/// a stream of small requests (a replica's fetches, a consumer's) is not
/// held up behind large produce requests.
pub const BUDGET_FREE_BYTES: usize = 64 * 1024;

impl<B, M> DecodeStream<B, M> {
    /// Decodes `body`, refusing messages longer than `max` bytes.
    pub fn new(body: B, max: usize) -> Self {
        Self {
            body,
            decoder: Decoder::new(max),
            done: false,
            budget: None,
            held: None,
            budget_wait_max: std::time::Duration::ZERO,
            budget_wait: None,
            _message: PhantomData,
        }
    }

    /// Reads no more of a message over [`BUDGET_FREE_BYTES`] until its
    /// declared length is taken from `budget` (one permit a byte, given
    /// back once it is decoded). Without one, a client opening many
    /// streams, each announcing a message of the largest size and
    /// sending it, made the receiver buffer them all: its memory had no
    /// bound. Meanwhile the stream's body is not read, and HTTP/2 flow
    /// control holds the sender back. `budget` must have at least the
    /// decoder's largest message in permits.
    ///
    /// A message that waits longer than `wait_max` is refused
    /// (RESOURCE_EXHAUSTED) and the stream ends: a stream that waits does
    /// not read its body, and what its sender sent meanwhile takes up the
    /// connection's HTTP/2 window, so streams of one connection that hold
    /// shares could otherwise wait for good for the rest of their
    /// messages.
    pub fn with_budget(mut self, budget: Arc<Semaphore>, wait_max: std::time::Duration) -> Self {
        self.budget = Some(PollSemaphore::new(budget));
        self.budget_wait_max = wait_max;
        self
    }

    /// Whether a message is being received under a share of the budget,
    /// or waits for one: its reader should read on until it is whole (or
    /// refused), holding that share only as long as the sender takes.
    pub fn holds_budget(&self) -> bool {
        // Waiting for its share counts: its queued acquire takes the
        // permits given back, and a reader that stopped polling for its
        // quota kept them from everyone.
        self.held.is_some() || self.budget_wait.is_some()
    }

    /// Runs `check` on every message before decoding it.
    pub fn with_check(mut self, check: DecodeCheck) -> Self {
        self.decoder.check = Some(check);
        self
    }
}

impl<B, M> Stream for DecodeStream<B, M>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    M: Message + Default,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decoder.next_message() {
                Ok(Some(msg)) => {
                    this.held = None;
                    return Poll::Ready(Some(Ok(msg)));
                }
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            // Only with a budget: a decoder without one (a client's, or
            // the other calls') does not read the prefix again per frame.
            if let (None, Some(budget)) = (&this.held, &mut this.budget) {
                if let Ok(Some(len)) = this.decoder.head_len() {
                    if len > BUDGET_FREE_BYTES {
                        let bytes = u32::try_from(len).unwrap_or(u32::MAX);
                        match budget.poll_acquire_many(cx, bytes) {
                            // None: the budget was closed, which nothing
                            // does.
                            Poll::Ready(permit) => {
                                this.held = permit;
                                this.budget_wait = None;
                            }
                            Poll::Pending => {
                                let wait_max = this.budget_wait_max;
                                let wait = this
                                    .budget_wait
                                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait_max)));
                                if wait.as_mut().poll(cx).is_pending() {
                                    return Poll::Pending;
                                }
                                this.done = true;
                                // Its queued acquire goes with it: left
                                // queued, it would take the next permits
                                // given back, for nobody.
                                this.budget = None;
                                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                                    "a message of {len} bytes waited {wait_max:?} for room among the requests being received (queued_request_bytes_max); try again"
                                )))));
                            }
                        }
                    }
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.decoder.push(data),
                    Err(frame) => {
                        // A response's trailers: a failed call ends with
                        // its status.
                        let failed = frame
                            .trailers_ref()
                            .and_then(Status::from_header_map)
                            .filter(|s| s.code() != tonic::Code::Ok);
                        if let Some(status) = failed {
                            this.done = true;
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                },
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Status::cancelled(format!(
                        "the stream broke: {e}"
                    )))));
                }
                None => {
                    this.done = true;
                    if this.decoder.buffered() > 0 {
                        return Poll::Ready(Some(Err(Status::internal(format!(
                            "the stream ended inside a message ({} bytes left over)",
                            this.decoder.buffered()
                        )))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ProduceRequest;

    fn request(batch_len: usize) -> ProduceRequest {
        ProduceRequest {
            topic: "orders".into(),
            partition: Some(3),
            batch: Bytes::from((0..batch_len).map(|i| i as u8).collect::<Vec<_>>()),
            correlation_id: 42,
            producer_id: 7,
            base_sequence: 9,
            ..Default::default()
        }
    }

    fn tonic_bytes<M: Message>(msg: &M) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn chunks_concatenate_to_the_standard_encoding_and_share_the_batch() {
        for len in [0, 10, CHUNK_MIN - 1, CHUNK_MIN, 65536] {
            let req = request(len);
            let chunks = encode(&req).unwrap();
            assert_eq!(chunks.concat(), tonic_bytes(&req), "batch of {len} bytes");
            let shared = chunks.iter().any(|c| c.as_ptr() == req.batch.as_ptr());
            assert_eq!(shared, len >= CHUNK_MIN, "batch of {len} bytes");
        }
    }

    #[test]
    fn a_batch_received_as_its_own_frame_is_not_copied() {
        let req = request(65536);
        let mut d = Decoder::new(1 << 20);
        let chunks = encode(&req).unwrap();
        let batch_frame = chunks.iter().find(|c| c.len() == 65536).unwrap().as_ptr();
        for c in chunks {
            d.push(c);
        }
        let got: ProduceRequest = d.next_message().unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(got.batch.as_ptr(), batch_frame);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn messages_split_and_joined_at_any_boundary_decode_the_same() {
        let msgs = [request(5000), request(3), request(70000)];
        let wire: Vec<u8> = msgs.iter().flat_map(tonic_bytes).collect();
        for step in [1, 2, 5, 7, 4096, 5005, 100_000] {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.push(Bytes::copy_from_slice(piece));
                while let Some(m) = d.next_message::<ProduceRequest>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "frames of {step} bytes");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn tiny_frames_are_copied_together_not_kept_one_by_one() {
        let req = request(100_000);
        let wire = tonic_bytes(&req);
        let mut d = Decoder::new(1 << 20);
        for (i, b) in wire.iter().enumerate() {
            d.push(Bytes::copy_from_slice(&[*b]));
            assert!(
                d.frames.parts.len() <= 1,
                "{} handles after {i} frames",
                d.frames.parts.len()
            );
            if i + 1 < wire.len() {
                assert!(d.next_message::<ProduceRequest>().unwrap().is_none());
            }
        }
        assert_eq!(d.next_message::<ProduceRequest>().unwrap(), Some(req));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_compressed_and_garbled_messages_are_refused() {
        let wire = tonic_bytes(&request(100));
        let mut d = Decoder::new(50);
        d.push(Bytes::from(wire.clone()));
        let e = d.next_message::<ProduceRequest>().unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");

        let mut compressed = wire.clone();
        compressed[0] = 1;
        let mut d = Decoder::new(1 << 20);
        d.push(Bytes::from(compressed));
        let e = d.next_message::<ProduceRequest>().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");

        // A length-delimited field claiming more bytes than the message has.
        let garbled = [0u8, 0, 0, 0, 2, 0x0a, 0x7f];
        let mut d = Decoder::new(1 << 20);
        d.push(Bytes::copy_from_slice(&garbled));
        let e = d.next_message::<ProduceRequest>().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e}");
    }

    #[tokio::test]
    async fn bodies_round_trip_and_a_server_body_ends_with_its_status() {
        use http_body_util::BodyExt;
        let msgs = vec![request(10), request(10_000)];
        let items: Vec<Result<ProduceRequest, Status>> = msgs.iter().cloned().map(Ok).collect();
        let body = EncodeBody::client(tokio_stream::iter(items));
        let mut stream = DecodeStream::<_, ProduceRequest>::new(body, 1 << 20);
        let mut got = Vec::new();
        while let Some(m) = tokio_stream::StreamExt::next(&mut stream).await {
            got.push(m.unwrap());
        }
        assert_eq!(got, msgs);

        let items: Vec<Result<ProduceRequest, Status>> =
            vec![Ok(request(1)), Err(Status::aborted("gone"))];
        let collected = EncodeBody::server(tokio_stream::iter(items))
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert_eq!(status.message(), "gone");
        assert_eq!(collected.to_bytes().to_vec(), tonic_bytes(&request(1)));

        let items: Vec<Result<ProduceRequest, Status>> =
            vec![Ok(request(1)), Err(Status::aborted("gone"))];
        let mut decoded = DecodeStream::<_, ProduceRequest>::new(
            EncodeBody::server(tokio_stream::iter(items)),
            1 << 20,
        );
        use tokio_stream::StreamExt;
        assert_eq!(decoded.next().await.unwrap().unwrap(), request(1));
        let e = decoded.next().await.unwrap().unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::Aborted, "gone"));
        assert!(decoded.next().await.is_none());

        let ok = EncodeBody::server(tokio_stream::iter(
            Vec::<Result<ProduceRequest, Status>>::new(),
        ))
        .collect()
        .await
        .unwrap();
        let status = Status::from_header_map(ok.trailers().unwrap()).unwrap();
        assert_eq!(status.code(), tonic::Code::Ok);
    }

    /// A message over the free size is read only once its length is
    /// taken from the shared budget: a second stream waits, its body
    /// unread, until the first stream's message is decoded.
    #[tokio::test]
    async fn large_messages_wait_for_the_budget_with_their_bodies_unread() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Waker;
        type Frames =
            tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, std::convert::Infallible>>;
        let budget = Arc::new(Semaphore::new(300_000));
        let open = |budget: &Arc<Semaphore>| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let reads = Arc::new(AtomicUsize::new(0));
            let counted = reads.clone();
            let frames = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                move |f| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    f
                },
            );
            let body = http_body_util::StreamBody::new(frames);
            let stream = DecodeStream::<_, ProduceRequest>::new(body, 1 << 20)
                .with_budget(budget.clone(), std::time::Duration::from_secs(60));
            (tx, reads, stream)
        };
        let send = |tx: &Frames, bytes: &[u8]| {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(bytes))))
                .unwrap();
        };
        let mut cx = Context::from_waker(Waker::noop());
        let msg = request(200_000);
        let wire = tonic_bytes(&msg);
        let (a_tx, _, mut a) = open(&budget);
        let (b_tx, b_reads, mut b) = open(&budget);
        send(&a_tx, &wire[..1000]);
        assert!(Pin::new(&mut a).poll_next(&mut cx).is_pending());
        assert_eq!(
            budget.available_permits(),
            300_000 - wire.len() + PREFIX_LEN
        );
        send(&b_tx, &wire[..1000]);
        send(&b_tx, &wire[1000..]);
        assert!(Pin::new(&mut b).poll_next(&mut cx).is_pending());
        assert!(Pin::new(&mut b).poll_next(&mut cx).is_pending());
        assert_eq!(b_reads.load(Ordering::SeqCst), 1, "only its prefix's frame");
        send(&a_tx, &wire[1000..]);
        match Pin::new(&mut a).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(m))) => assert_eq!(m, msg),
            other => panic!("{other:?}"),
        }
        // Handed on to the waiting stream.
        assert_eq!(
            budget.available_permits(),
            300_000 - wire.len() + PREFIX_LEN
        );
        match Pin::new(&mut b).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(m))) => assert_eq!(m, msg),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.available_permits(), 300_000);
        // Small messages take nothing.
        let (c_tx, _, mut c) = open(&Arc::new(Semaphore::new(0)));
        send(&c_tx, &tonic_bytes(&request(1000)));
        assert!(matches!(
            Pin::new(&mut c).poll_next(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
    }

    /// A message that waits too long for its share is refused, and its
    /// queued acquire goes with it: the next stream gets the permits.
    #[tokio::test]
    async fn a_message_that_waits_too_long_for_the_budget_is_refused() {
        use tokio_stream::StreamExt;
        let budget = Arc::new(Semaphore::new(100_000));
        let held = budget.clone().acquire_many_owned(100_000).await.unwrap();
        let wire = tonic_bytes(&request(70_000));
        let frames = [&wire[..1000], &wire[1000..]]
            .map(|f| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(f))));
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let mut stream = DecodeStream::<_, ProduceRequest>::new(body, 1 << 20)
            .with_budget(budget.clone(), std::time::Duration::from_millis(50));
        match stream.next().await {
            Some(Err(e)) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}"),
            Some(Ok(_)) => panic!("decoded without room in the budget"),
            None => panic!("ended"),
        }
        assert!(stream.next().await.is_none());
        drop(held);
        // Nobody waits on in its place.
        assert_eq!(budget.available_permits(), 100_000);
    }
}

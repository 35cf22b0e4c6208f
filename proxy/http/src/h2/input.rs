//! The connection's input side: frames read from the client, checked and applied, and the
//! streams they open. Every error here is either a stream's (RST_STREAM, the connection
//! goes on) or the connection's (`ConnError`, GOAWAY).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use tokio::time::Instant;

use bytes::{Buf, Bytes, BytesMut};

use super::request::StreamHead;
use super::*;
use crate::body::ClientBody;
use crate::recv::{Credit, RecvBody, WindowCredit, WindowRelease};
use crate::service::{Refusal, Reply, Service};
use fluxgate_wire::h2::frame::*;

impl<S: Service> H2Connection<S> {
    /// Handles every complete frame in `buf`.
    pub(super) fn frames(&mut self, buf: &mut BytesMut) -> Result<(), ConnError> {
        if !self.preface {
            let n = buf.len().min(PREFACE.len());
            if buf[..n] != PREFACE[..n] {
                return Err(ConnError(PROTOCOL_ERROR, Fault::BadConnectionPreface));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            buf.advance(n);
            self.preface = true;
        }
        loop {
            let head = FrameHead::parse(buf, MAX_FRAME)
                .map_err(|_| ConnError(FRAME_SIZE_ERROR, Fault::FrameAboveSettingsMaxFrameSize))?;
            let Some(FrameHead {
                len,
                kind,
                flags,
                id,
            }) = head
            else {
                break;
            };
            if !self.settings && kind != SETTINGS {
                return Err(ConnError(PROTOCOL_ERROR, Fault::FirstFrameIsNotSettings));
            }
            if self
                .partial
                .is_some_and(|(p, _)| kind != CONTINUATION || p != id)
            {
                return Err(ConnError(PROTOCOL_ERROR, Fault::HeaderBlockInterrupted));
            }
            if kind == DATA {
                buf.advance(9);
                let payload = buf.split_to(len).freeze();
                self.on_data(id, flags, payload)?;
            } else {
                let r = self.on_frame(kind, flags, id, &buf[9..9 + len]);
                buf.advance(9 + len);
                r?;
            }
            if self.closing.is_some_and(|c| c != NO_ERROR) {
                break;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, kind: u8, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        match kind {
            HEADERS => self.on_headers(id, flags, p),
            CONTINUATION => {
                let Some((_, end_stream)) = self.partial else {
                    return Err(ConnError(PROTOCOL_ERROR, Fault::ContinuationWithoutHeaders));
                };
                self.add_block(p)?;
                if flags & END_HEADERS != 0 {
                    self.partial = None;
                    self.end_headers(id, end_stream)?;
                }
                Ok(())
            }
            PRIORITY => self.on_priority(id, p),
            RST_STREAM => self.on_reset(id, p),
            SETTINGS => self.on_settings(id, flags, p),
            PUSH_PROMISE => Err(ConnError(PROTOCOL_ERROR, Fault::PushPromiseFromAClient)),
            PING => {
                if id != 0 {
                    return Err(ConnError(PROTOCOL_ERROR, Fault::PingOnAStream));
                }
                if p.len() != 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, Fault::PingLength));
                }
                if flags & ACK == 0 {
                    frame_head(&mut self.wbuf, 8, PING, ACK, 0);
                    self.wbuf.extend_from_slice(p);
                } else if self.drain_announced && p == DRAIN_PING {
                    // Every stream opened before the first GOAWAY is in: the final one.
                    self.go_away(ConnError(NO_ERROR, Fault::ShuttingDown));
                }
                Ok(())
            }
            GOAWAY => {
                if id != 0 {
                    return Err(ConnError(PROTOCOL_ERROR, Fault::GoawayOnAStream));
                }
                if p.len() < 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, Fault::GoawayLength));
                }
                self.client_gone = true;
                Ok(())
            }
            WINDOW_UPDATE => self.on_window_update(id, p),
            // Unknown frame types are ignored (RFC 9113 5.5).
            _ => Ok(()),
        }
    }

    /// PRIORITY is advisory and otherwise ignored, but its rules hold (RFC 9113 6.3, 5.3.1).
    fn on_priority(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if id == 0 {
            return Err(ConnError(PROTOCOL_ERROR, Fault::PriorityOnStream0));
        }
        if p.len() != 5 {
            self.stream_error(id, FRAME_SIZE_ERROR);
        } else if depends_on(p) == id {
            self.stream_error(id, PROTOCOL_ERROR);
        }
        Ok(())
    }

    /// A stream error on `id`, open or not: RST_STREAM, and the stream ends if it is open.
    fn stream_error(&mut self, id: u32, code: u32) {
        if self.streams.contains_key(&id) {
            self.reset(id, code);
        } else {
            self.refuse(id, code);
        }
    }

    fn on_settings(&mut self, id: u32, flags: u8, p: &[u8]) -> Result<(), ConnError> {
        if id != 0 {
            return Err(ConnError(PROTOCOL_ERROR, Fault::SettingsOnAStream));
        }
        if flags & ACK != 0 {
            return match p.is_empty() {
                true => Ok(()),
                false => Err(ConnError(FRAME_SIZE_ERROR, Fault::SettingsAckWithAPayload)),
            };
        }
        if p.len() % 6 != 0 {
            return Err(ConnError(FRAME_SIZE_ERROR, Fault::SettingsLength));
        }
        for s in p.chunks_exact(6) {
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match u16::from_be_bytes([s[0], s[1]]) {
                SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(ConnError(PROTOCOL_ERROR, Fault::SettingsEnablePushAbove1))
                }
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = value as i64;
                    if value > MAX_WINDOW {
                        return Err(ConnError(FLOW_CONTROL_ERROR, Fault::InitialWindowTooLarge));
                    }
                    let delta = value - self.peer_window;
                    self.peer_window = value;
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                        if s.send_window > MAX_WINDOW {
                            return Err(ConnError(FLOW_CONTROL_ERROR, Fault::StreamWindowOverflow));
                        }
                        if delta > 0 {
                            s.wake.queue(false);
                        }
                    }
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(MAX_FRAME as u32..=0xff_ffff).contains(&value) {
                        return Err(ConnError(PROTOCOL_ERROR, Fault::SettingsMaxFrameSizeRange));
                    }
                    self.peer_max_frame = value as usize;
                }
                // The header table size needs nothing (the encoder adds no entries);
                // concurrency and header list limits are for pushes and requests we never make.
                _ => {}
            }
        }
        self.settings = true;
        frame_head(&mut self.wbuf, 0, SETTINGS, ACK, 0);
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if p.len() != 4 {
            return Err(ConnError(FRAME_SIZE_ERROR, Fault::WindowUpdateLength));
        }
        let inc = (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff) as i64;
        if id == 0 {
            if inc == 0 {
                return Err(ConnError(PROTOCOL_ERROR, Fault::WindowUpdateOf0));
            }
            self.conn_send += inc;
            if self.conn_send > MAX_WINDOW {
                return Err(ConnError(
                    FLOW_CONTROL_ERROR,
                    Fault::ConnectionWindowOverflow,
                ));
            }
            for s in self.streams.values() {
                s.wake.queue(false);
            }
            return Ok(());
        }
        match self.streams.get_mut(&id) {
            // WINDOW_UPDATE of 0.
            Some(_) if inc == 0 => self.reset(id, PROTOCOL_ERROR),
            Some(s) => {
                s.send_window += inc;
                if s.send_window > MAX_WINDOW {
                    // Stream window overflow.
                    self.reset(id, FLOW_CONTROL_ERROR);
                } else {
                    s.wake.queue(false);
                }
            }
            None if id > self.last_id => {
                return Err(ConnError(PROTOCOL_ERROR, Fault::WindowUpdateOnAnIdleStream))
            }
            // After the client's own RST_STREAM (5.1); after END_STREAM both ways it may
            // still come for a while.
            None => {
                if self.closed_as(id) == Some(Closed::ClientReset) {
                    self.refuse(id, STREAM_CLOSED)
                }
            }
        }
        Ok(())
    }

    fn on_reset(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if p.len() != 4 {
            return Err(ConnError(FRAME_SIZE_ERROR, Fault::RstStreamLength));
        }
        if id == 0 || id > self.last_id {
            return Err(ConnError(PROTOCOL_ERROR, Fault::RstStreamOnAnIdleStream));
        }
        // A reset of a stream already closed is ignored (never answered with a reset).
        if let Some(s) = self.streams.remove(&id) {
            self.remember(id, Closed::ClientReset);
            if matches!(s.out, ResponseState::Waiting(_)) {
                self.resets -= 1;
                if self.resets < 0 {
                    return Err(ConnError(ENHANCE_YOUR_CALM, Fault::TooManyStreamsReset));
                }
            }
            self.close_recv(&s, BodyError::ClientReset);
        }
        Ok(())
    }

    fn on_headers(&mut self, id: u32, flags: u8, mut p: &[u8]) -> Result<(), ConnError> {
        if id == 0 || id % 2 == 0 {
            return Err(ConnError(
                PROTOCOL_ERROR,
                Fault::HeadersOnAStreamAClientCannotOpen,
            ));
        }
        if flags & PADDED != 0 {
            let (&pad, rest) = p
                .split_first()
                .ok_or(ConnError(FRAME_SIZE_ERROR, Fault::HeadersPadding))?;
            if pad as usize > rest.len() {
                return Err(ConnError(PROTOCOL_ERROR, Fault::PaddingLongerThanTheFrame));
            }
            p = &rest[..rest.len() - pad as usize];
        }
        self.self_dependent = false;
        if flags & PRIORITY_FLAG != 0 {
            let signal = p
                .get(..5)
                .ok_or(ConnError(FRAME_SIZE_ERROR, Fault::HeadersPriority))?;
            self.self_dependent = depends_on(signal) == id;
            p = &p[5..];
        }
        self.block.clear();
        self.block_frames = 0;
        self.add_block(p)?;
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS != 0 {
            self.end_headers(id, end_stream)
        } else {
            self.partial = Some((id, end_stream));
            Ok(())
        }
    }

    fn add_block(&mut self, p: &[u8]) -> Result<(), ConnError> {
        // Compressed, a block is seldom larger than the list it decodes to; twice the list
        // limit leaves room and still bounds what a client can make us hold. Empty
        // CONTINUATION frames are counted too: a block may not go on for ever.
        self.block_frames += 1;
        if self.block.len() + p.len() > 2 * self.limits.max_head + MAX_FRAME
            || self.block_frames > MAX_BLOCK_FRAMES
        {
            return Err(ConnError(ENHANCE_YOUR_CALM, Fault::HeaderBlockTooLarge));
        }
        self.block.extend_from_slice(p);
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn end_headers(&mut self, id: u32, end_stream: bool) -> Result<(), ConnError> {
        let mut head = StreamHead::new(self.limits.max_head);
        let block = std::mem::take(&mut self.block);
        // Decoded whatever becomes of the stream: the table must stay in step with the client.
        let decoded = self.decoder.decode(&block, |f| head.add(f));
        self.block = block;
        decoded.map_err(|_| ConnError(COMPRESSION_ERROR, Fault::HeaderBlockDoesNotDecode))?;
        if self.self_dependent && self.streams.contains_key(&id) {
            // A stream cannot depend on itself (5.3.1): a stream error.
            self.self_dependent = false;
            self.reset(id, PROTOCOL_ERROR);
            return Ok(());
        }
        if let Some(s) = self.streams.get(&id) {
            let Some(recv) = &s.recv else {
                // HEADERS after the end of the stream.
                self.reset(id, STREAM_CLOSED);
                return Ok(());
            };
            let mut r = recv.lock().expect("recv lock");
            if !end_stream || head.malformed || head.has_pseudo() {
                drop(r);
                // Malformed trailers.
                self.reset(id, PROTOCOL_ERROR);
            } else if r.declared.is_some_and(|n| n != r.received) {
                drop(r);
                // Body shorter than its Content-Length.
                self.reset(id, PROTOCOL_ERROR);
            } else {
                r.trailers = Some(head.headers);
                r.end = true;
                r.wake();
                drop(r);
                self.recv_ended(id);
            }
            return Ok(());
        }
        if id <= self.last_id {
            return match self.closed_as(id) {
                // Trailers racing our reset of the stream are dropped.
                Some(Closed::WeReset) => Ok(()),
                Some(Closed::ClientReset) => {
                    self.refuse(id, STREAM_CLOSED);
                    Ok(())
                }
                Some(Closed::Ended) => Err(ConnError(STREAM_CLOSED, Fault::HeadersOnAClosedStream)),
                // Any other head on an old stream id (5.1.1).
                None => Err(ConnError(PROTOCOL_ERROR, Fault::HeadersOnAnOldStreamId)),
            };
        }
        self.last_id = id;
        if self.self_dependent {
            self.self_dependent = false;
            self.refuse_stream(id, Refusal::MalformedStream, PROTOCOL_ERROR);
            return Ok(());
        }
        if self.closing.is_some() || self.client_gone || self.streams.len() >= MAX_STREAMS {
            self.refuse_stream(id, Refusal::StreamRefused, REFUSED_STREAM);
            return Ok(());
        }
        if head.malformed {
            self.refuse_stream(id, Refusal::MalformedStream, PROTOCOL_ERROR);
            return Ok(());
        }
        self.open(id, head, end_stream);
        Ok(())
    }

    /// Starts a stream's request.
    fn open(&mut self, id: u32, head: StreamHead, end_stream: bool) {
        let wake = Arc::new(StreamWake {
            id,
            queued: AtomicBool::new(false),
            shared: Arc::clone(&self.shared),
        });
        let waker = Waker::from(Arc::clone(&wake));
        let inflight = self.state.begin_request();
        let now = Instant::now();
        let too_large = if head.size > self.limits.max_head {
            Some(Refusal::HeadTooLarge)
        } else {
            (head.fields > self.limits.max_headers).then_some(Refusal::TooManyFields)
        };
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let recv = (!end_stream).then(|| Arc::new(Mutex::new(Recv::new(declared))));
        if recv.is_some() {
            let first = self.state.body_deadline(now, 0);
            let idle = now + self.state.body_timeout;
            sweep_by(&mut self.sweep, first.map_or(idle, |d| d.min(idle)));
        }
        let body = match &recv {
            Some(r) => ClientBody::Stream(RecvBody {
                recv: Arc::clone(r),
                credit: Credit::H2(WindowCredit {
                    conn: Arc::clone(&self.shared) as Arc<dyn WindowRelease>,
                    stream: waker.clone(),
                    widen_at: STREAM_WINDOW as usize / 2,
                }),
            }),
            None => ClientBody::Empty,
        };
        let out = if let Some(why) = too_large {
            ResponseState::Ready(Some(Box::new(self.svc.refuse(why, inflight))))
        } else {
            match head.into_request(body) {
                Some(req) => match self.svc.call(req, inflight) {
                    Reply::Ready(resp) => ResponseState::Ready(resp),
                    Reply::Later(f) => ResponseState::Waiting(f),
                },
                None => {
                    drop(inflight);
                    self.refuse_stream(id, Refusal::MalformedStream, PROTOCOL_ERROR);
                    return;
                }
            }
        };
        self.streams.insert(
            id,
            Stream {
                out,
                recv,
                recv_window: STREAM_WINDOW as i64,
                send_window: self.peer_window,
                opened: now,
                body_at: now,
                send_blocked: None,
                wake,
                waker,
            },
        );
        // Started at once: the request is on its way upstream before the next frame.
        self.poll_stream(id);
    }

    fn on_data(&mut self, id: u32, flags: u8, mut p: Bytes) -> Result<(), ConnError> {
        if id == 0 {
            return Err(ConnError(PROTOCOL_ERROR, Fault::DataOnStream0));
        }
        let len = p.len();
        self.conn_recv -= len as i64;
        if self.conn_recv < 0 {
            return Err(ConnError(
                FLOW_CONTROL_ERROR,
                Fault::ConnectionWindowExceeded,
            ));
        }
        if flags & PADDED != 0 {
            let pad = *p
                .first()
                .ok_or(ConnError(FRAME_SIZE_ERROR, Fault::DataPadding))?
                as usize;
            if pad >= len {
                return Err(ConnError(PROTOCOL_ERROR, Fault::PaddingLongerThanTheFrame));
            }
            p = p.slice(1..len - pad);
        }
        // Padding is never read by anyone: credited now.
        let mut credit = len - p.len();
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                return Err(ConnError(PROTOCOL_ERROR, Fault::DataOnAnIdleStream));
            }
            // A closed stream's: dropped, credited, and answered as it closed (5.1).
            self.credit(len);
            match self.closed_as(id) {
                Some(Closed::Ended) => {
                    return Err(ConnError(STREAM_CLOSED, Fault::DataOnAClosedStream))
                }
                Some(Closed::ClientReset) => self.refuse(id, STREAM_CLOSED),
                // Sent before the client saw our reset, or closed too long ago to say.
                Some(Closed::WeReset) | None => {}
            }
            return Ok(());
        };
        let Some(recv) = &s.recv else {
            self.credit(len);
            // DATA after the end of the stream.
            self.reset(id, STREAM_CLOSED);
            return Ok(());
        };
        s.recv_window -= len as i64;
        s.body_at = Instant::now();
        let end = flags & END_STREAM != 0;
        let mut r = recv.lock().expect("recv lock");
        r.received += p.len() as u64;
        let bad_length = r
            .declared
            .is_some_and(|n| r.received > n || (end && r.received != n));
        // Past the stream's window, or a body length that differs from its Content-Length.
        let failure = if s.recv_window < 0 {
            Some(FLOW_CONTROL_ERROR)
        } else if bad_length {
            Some(PROTOCOL_ERROR)
        } else {
            None
        };
        if let Some(code) = failure {
            drop(r);
            self.credit(len);
            self.reset(id, code);
            return Ok(());
        }
        r.consumed += credit;
        if r.dropped {
            credit += p.len();
        }
        r.push(p);
        r.end |= end;
        r.wake();
        drop(r);
        let answered = matches!(s.out, ResponseState::Done);
        let window_spent = s.recv_window <= 0;
        self.credit(credit);
        if end {
            self.recv_ended(id);
        } else if answered && window_spent {
            // A window's worth dropped after the answer: the client may stop now.
            // Stream reset after its answer.
            self.reset(id, NO_ERROR);
        }
        Ok(())
    }

    /// The client ended its side of the stream (END_STREAM on DATA or trailers). A stream
    /// already answered in full is done with.
    fn recv_ended(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv = None;
            if matches!(s.out, ResponseState::Done) {
                self.finished(id);
            }
        }
    }

    /// Gathers connection window credit; announces it once a quarter of the window is back.
    pub(super) fn credit(&mut self, n: usize) {
        self.conn_unacked += n;
        if self.conn_unacked >= CONN_WINDOW as usize / 4 {
            if self.conn_recv <= 0 {
                // The client had no room at all: its bodies' idle time starts again now.
                let now = Instant::now();
                for s in self.streams.values_mut() {
                    s.body_at = now;
                }
            }
            self.conn_recv += self.conn_unacked as i64;
            frame_head(&mut self.wbuf, 4, WINDOW_UPDATE, 0, 0);
            self.wbuf
                .extend_from_slice(&(self.conn_unacked as u32).to_be_bytes());
            self.conn_unacked = 0;
        }
    }

    /// The stream's request body ends here: the reader fails unless it had it all, and what
    /// it never read is credited back.
    pub(super) fn close_recv(&mut self, s: &Stream<S>, why: BodyError) {
        if let Some(recv) = &s.recv {
            let mut r = recv.lock().expect("recv lock");
            r.fail(why);
            r.dropped = true;
            let unread = std::mem::take(&mut r.queued);
            r.queue.clear();
            drop(r);
            self.credit(unread);
        }
    }

    /// Sends RST_STREAM, remembering the id for a while: frames the client sent before it
    /// saw the reset may still come.
    pub(super) fn refuse(&mut self, id: u32, code: u32) {
        frame_head(&mut self.wbuf, 4, RST_STREAM, 0, id);
        self.wbuf.extend_from_slice(&code.to_be_bytes());
        self.remember(id, Closed::WeReset);
    }

    /// Refuses a new stream with RST_STREAM, counted and logged by the service.
    fn refuse_stream(&mut self, id: u32, why: Refusal, code: u32) {
        self.svc.reset(why, &self.state);
        self.refuse(id, code);
    }

    /// Ends a stream with RST_STREAM; a reader of its body still open gets `why`.
    pub(super) fn reset(&mut self, id: u32, code: u32) {
        self.refuse(id, code);
        if let Some(s) = self.streams.remove(&id) {
            self.close_recv(&s, BodyError::StreamReset(code));
        }
    }
}

/// The stream a priority signal (PRIORITY's payload, or the start of HEADERS with the
/// PRIORITY flag) makes this one depend on.
fn depends_on(signal: &[u8]) -> u32 {
    u32::from_be_bytes([signal[0], signal[1], signal[2], signal[3]]) & 0x7fff_ffff
}

//! The bridge's MQTT session: one task owns the connection to the broker, reads every message it
//! sends, hands it on, and writes each acknowledgement once Kafka has the record.
//!
//! Why our own session rather than rumqttc's event loop (which the simulator and the load
//! harness still use to publish): two things the bridge must do that no Rust MQTT client does.
//! - **Any size.** rumqttc reads a packet whole or drops the connection when it is larger than
//!   its limit; the broker then sends the same message again on the next connection, for ever
//!   (one 1 MB message stopped the fleet: issue 19). Here a PUBLISH larger than
//!   `TELEMETRY_MQTT_MAX_PACKET_BYTES` is read through: its topic, packet id and first 64 KiB
//!   are kept, the rest is discarded as it arrives, and the message goes on (to the DLQ, as
//!   `payload_too_large`) and is acknowledged like any other.
//! - **Backpressure in bytes.** When the messages read but not yet produced reach
//!   `TELEMETRY_BRIDGE_MAX_QUEUED_BYTES`, the session stops reading the socket: TCP holds the
//!   broker back, which keeps what it has not sent in its own queue (persistent session). rumqttc
//!   must be polled to answer pings, so a bridge built on it had to read on (Mosquitto 2.0.11
//!   overshoots its in-flight window, and 350,000 messages piled up in the bridge). Pings do not
//!   need reading here: the session sends PINGREQ on time whatever it reads, and takes the
//!   connection for dead only when nothing at all arrives while it is reading.
//!
//! Packets are encoded and decoded by rumqttc's `mqttbytes` (CONNECT, SUBSCRIBE, PUBACK, ...);
//! only PUBLISH is parsed here, so that a large one can be read through.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use telemetry_core::KEPT_PAYLOAD_BYTES;
use telemetry_ops::Readiness;

use telemetry_metrics::{series, Progress, EVENTS_RECEIVED};

use crate::instruments::{self, SERVICE};
use crate::{BridgeConfig, Error, Result, MQTT_SUBSCRIBED};

/// The largest MQTT packet the bridge reads whole, unless `TELEMETRY_MQTT_MAX_PACKET_BYTES` says
/// otherwise: Mosquitto's `max_packet_size` in `deploy/mosquitto/mosquitto.conf` and the
/// embedded broker of `telemetry up` are set to the same value.
pub const DEFAULT_MQTT_MAX_PACKET_BYTES: usize = 1_048_576;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest wait for the TCP (and TLS) connection and the broker's CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for a write (acknowledgements, pings) to reach the socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest packet other than PUBLISH the broker may send us (CONNACK, SUBACK, PINGRESP are a few
/// bytes): anything larger is a protocol error.
const MAX_CONTROL_PACKET_BYTES: usize = 64 * 1024;

/// MQTT packet types, the high nibble of a packet's first byte.
const PUBLISH: u8 = 3;

/// One message received from the broker.
#[derive(Debug)]
pub(crate) struct Message {
    /// Which connection it arrived on. An acknowledgement is only valid on that connection: after
    /// a reconnect the broker redelivers every unacknowledged message itself.
    pub generation: u64,
    /// The topic it was published to (invalid UTF-8, which brokers refuse, replaced).
    pub topic: String,
    /// Its packet id, for the acknowledgement; `None` for QoS 0, which is not acknowledged.
    pub pkid: Option<u16>,
    /// The payload; only its first [`KEPT_PAYLOAD_BYTES`] when `original_bytes` is set.
    pub payload: Bytes,
    /// Set when the packet was larger than the bridge reads whole: the payload's full size.
    pub original_bytes: Option<u64>,
    /// When the bridge received it, UTC milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The device id taken from the topic, when the topic has one.
    pub device_id: Option<String>,
    /// The bytes it holds against the queue's bound, given back when it leaves the queue.
    pub queued: Option<Charge>,
}

/// A byte bound shared by a producer of messages and their consumer: the producer waits for
/// room, the consumer gives bytes back by dropping each message's [`Charge`].
#[derive(Debug)]
pub(crate) struct ByteBound {
    limit: usize,
    used: AtomicUsize,
    /// Woken whenever bytes are given back.
    freed: Notify,
    gauge: metrics::Gauge,
}

impl ByteBound {
    /// A bound of `limit` bytes, reported on `gauge`.
    pub fn new(limit: usize, gauge: metrics::Gauge) -> Arc<Self> {
        Arc::new(ByteBound {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            freed: Notify::new(),
            gauge,
        })
    }

    /// Whether anything more may be taken (one item may then pass the bound).
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::Acquire) < self.limit
    }

    /// Resolves once there is room.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so bytes given back in between are not missed.
            freed.as_mut().enable();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }

    /// Takes `bytes` until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        let used = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        #[allow(clippy::cast_precision_loss)]
        self.gauge.set(used as f64);
        Charge {
            bound: self.clone(),
            bytes,
        }
    }
}

/// Bytes held against a [`ByteBound`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    bound: Arc<ByteBound>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let used = self.bound.used.fetch_sub(self.bytes, Ordering::AcqRel) - self.bytes;
        #[allow(clippy::cast_precision_loss)]
        self.bound.gauge.set(used as f64);
        self.bound.freed.notify_waiters();
    }
}

/// An acknowledgement to send: the packet id, on the connection it is valid on.
#[derive(Debug)]
struct Ack {
    generation: u64,
    pkid: u16,
}

/// Handle to the MQTT task: acknowledges messages and disconnects.
#[derive(Debug)]
pub(crate) struct MqttHandle {
    acks: mpsc::UnboundedSender<Ack>,
    /// Incremented by the MQTT task on every connection loss; see [`Message::generation`].
    generation: Arc<AtomicU64>,
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl MqttHandle {
    /// Acknowledges `message` to the broker, unless the connection it came on is gone (the broker
    /// then redelivers it, and this bridge produces it again: at-least-once).
    pub fn ack(&self, message: &Message) {
        let Some(pkid) = message.pkid else { return };
        if message.generation != self.generation.load(Ordering::Acquire) {
            instruments::MQTT_ACKS_SKIPPED
                .counter_of(series!(SERVICE, "reconnected"))
                .increment(1);
            return;
        }
        // The session reads this channel until it ends; then nothing needs acknowledging.
        let _ = self.acks.send(Ack {
            generation: message.generation,
            pkid,
        });
    }

    /// Writes the acknowledgements already given, sends DISCONNECT (keeping the persistent
    /// session) and waits briefly for the task to end.
    pub async fn disconnect(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// The topic segment matched by the first `+` of `filter`, e.g. `pico-1` for
/// `devices/+/telemetry` and `devices/pico-1/telemetry`.
pub fn device_id_from_topic<'a>(filter: &str, topic: &'a str) -> Option<&'a str> {
    let position = filter.split('/').position(|segment| segment == "+")?;
    topic.split('/').nth(position).filter(|id| !id.is_empty())
}

/// Connects (in the background) and returns the handle plus the stream of received messages.
/// Reading pauses while the messages in the stream hold `queue`'s bytes.
pub(crate) fn start(
    config: &BridgeConfig,
    readiness: Arc<Readiness>,
    queue: Arc<ByteBound>,
    progress: Arc<Progress>,
) -> Result<(MqttHandle, mpsc::UnboundedReceiver<Message>)> {
    let options = config.mqtt.options(&config.mqtt_client_id, |options| {
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(config.limits.mqtt_max_packet_bytes, 65_536);
    })?;
    // Unbounded in count, bounded in bytes by `queue`: the session stops reading at the bound.
    let (sender, receiver) = mpsc::unbounded_channel();
    let (acks, ack_receiver) = mpsc::unbounded_channel();
    let generation = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Session {
            options,
            filter: config.mqtt_topic.clone(),
            subscription: config.subscription(),
            sender,
            acks: ack_receiver,
            generation: generation.clone(),
            readiness,
            queue,
            progress,
            stop: stop.clone(),
        }
        .run(),
    );
    Ok((
        MqttHandle {
            acks,
            generation,
            task,
            stop,
        },
        receiver,
    ))
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting failed: {0}")]
    Connect(std::io::Error),
    #[error("the connection to the broker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("no answer from the broker for {0:?}")]
    Silent(Duration),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("the broker sent something that is not MQTT 3.1.1: {0}")]
    Protocol(String),
    #[error("a write to the broker did not finish in time")]
    WriteTimeout,
    #[error("the broker did not answer the connection request in time")]
    ConnectTimeout,
}

struct Session {
    options: MqttOptions,
    /// The topic filter: where in a topic the device id is.
    filter: String,
    /// What is subscribed: the filter, or `$share/<group>/<filter>`.
    subscription: String,
    sender: mpsc::UnboundedSender<Message>,
    acks: mpsc::UnboundedReceiver<Ack>,
    generation: Arc<AtomicU64>,
    readiness: Arc<Readiness>,
    queue: Arc<ByteBound>,
    /// Counts the messages received.
    progress: Arc<Progress>,
    stop: CancellationToken,
}

/// How a connection ended when it did not fail.
enum Ended {
    /// Stopped on request, after DISCONNECT.
    Stopped,
}

impl Session {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(250);
        let errors = instruments::counter(&instruments::MQTT_CONNECTION_ERRORS);
        loop {
            let connected = tokio::select! {
                () = self.stop.cancelled() => break,
                connected = self.connect() => connected,
            };
            let result = match connected {
                Ok((reader, writer, connack)) => {
                    backoff = Duration::from_millis(250);
                    tracing::info!(
                        session_present = connack.session_present,
                        "Connected to the MQTT broker."
                    );
                    self.serve(reader, writer).await
                }
                Err(error) => Err(error),
            };
            self.readiness.set(MQTT_SUBSCRIBED, false);
            match result {
                Ok(Ended::Stopped) => break,
                Err(error) => {
                    // Acknowledgements of this connection's messages are void from now on.
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    errors.increment(1);
                    tracing::warn!(%error, retry_in = ?backoff, "MQTT connection lost; reconnecting.");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.readiness.set(MQTT_SUBSCRIBED, false);
    }

    /// Opens the connection (TCP, TLS when configured), sends CONNECT and waits for CONNACK.
    async fn connect(&self) -> Result<(Reader, Writer, ConnAck), SessionError> {
        let (host, port) = self.options.broker_address();
        let opened = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(SessionError::Connect)?;
            // Each acknowledgement goes out at once, not after the broker's delayed ACK.
            tcp.set_nodelay(true).map_err(SessionError::Connect)?;
            let stream: Box<dyn Stream> = match self.options.transport() {
                Transport::Tls(TlsConfiguration::Rustls(tls)) => {
                    let name = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|error| SessionError::Protocol(error.to_string()))?;
                    let connector = rumqttc::tokio_rustls::TlsConnector::from(tls);
                    Box::new(
                        connector
                            .connect(name, tcp)
                            .await
                            .map_err(SessionError::Connect)?,
                    )
                }
                _ => Box::new(tcp),
            };
            let (read, write) = tokio::io::split(stream);
            let mut reader = Reader::new(read, self.options.max_packet_size());
            let mut writer = Writer::new(write);
            let mut connect = Connect::new(self.options.client_id());
            connect.keep_alive =
                u16::try_from(self.options.keep_alive().as_secs()).unwrap_or(u16::MAX);
            // The broker keeps our subscription and queues messages while we are away.
            connect.clean_session = false;
            connect.login = self.options.credentials();
            writer.send(&Packet::Connect(connect)).await?;
            match reader.next().await? {
                Incoming::ConnAck(connack) if connack.code == ConnectReturnCode::Success => {
                    Ok((reader, writer, connack))
                }
                Incoming::ConnAck(connack) => Err(SessionError::Refused(connack.code)),
                _ => Err(SessionError::Protocol("no CONNACK".into())),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, opened)
            .await
            .map_err(|_| SessionError::ConnectTimeout)?
    }

    /// Subscribes, then reads messages and writes acknowledgements until the connection fails or
    /// the session is stopped.
    async fn serve(
        &mut self,
        mut reader: Reader,
        mut writer: Writer,
    ) -> Result<Ended, SessionError> {
        let mut subscribe = Subscribe::new(self.subscription.as_str(), QoS::AtLeastOnce);
        subscribe.pkid = 1;
        writer.send(&Packet::Subscribe(subscribe)).await?;
        let generation = self.generation.load(Ordering::Acquire);
        let keep_alive = self.options.keep_alive().max(Duration::from_secs(1));
        let mut ping = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When something last arrived, or reading last resumed: while reading, a connection with
        // nothing arriving for twice the keep-alive (a PINGRESP is due every keep-alive) is dead.
        let mut heard = Instant::now();
        let received = instruments::counter(&EVENTS_RECEIVED);
        let read_through = instruments::counter(&instruments::MQTT_MESSAGES_READ_THROUGH);
        let paused = instruments::BACKPRESSURE.counter_of(series!(SERVICE, "queued_bytes"));
        let mut reading = true;
        loop {
            let room = self.queue.has_room();
            if room != reading {
                reading = room;
                heard = Instant::now();
                if !room {
                    paused.increment(1);
                }
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    // Acknowledgements given before the stop still go out.
                    while let Ok(ack) = self.acks.try_recv() {
                        writer.queue_ack(generation, &ack);
                    }
                    writer.queue(&Packet::Disconnect);
                    // The connection ends either way; a broker that does not take the last
                    // acknowledgements redelivers those messages.
                    let _ = writer.flush().await;
                    return Ok(Ended::Stopped);
                }
                ack = self.acks.recv() => {
                    let Some(ack) = ack else { return Ok(Ended::Stopped) };
                    writer.queue_ack(generation, &ack);
                    while let Ok(ack) = self.acks.try_recv() {
                        writer.queue_ack(generation, &ack);
                    }
                    writer.flush().await?;
                }
                _ = ping.tick() => {
                    if reading && heard.elapsed() > keep_alive * 2 {
                        return Err(SessionError::Silent(heard.elapsed()));
                    }
                    writer.send(&Packet::PingReq).await?;
                }
                () = self.queue.room(), if !reading => {}
                incoming = reader.next(), if reading => {
                    heard = Instant::now();
                    match incoming? {
                        Incoming::Publish(publication) => {
                            received.increment(1);
                            Progress::add(&self.progress.received, 1);
                            if publication.original_bytes.is_some() {
                                read_through.increment(1);
                            }
                            self.hand_on(publication, generation);
                        }
                        Incoming::SubAck(suback) => self.subscribed(&suback),
                        Incoming::ConnAck(_) => {
                            return Err(SessionError::Protocol("a second CONNACK".into()))
                        }
                        Incoming::Other => {}
                    }
                }
            }
        }
    }

    fn subscribed(&self, suback: &SubAck) {
        let refused = suback
            .return_codes
            .iter()
            .any(|code| matches!(code, SubscribeReasonCode::Failure));
        if refused {
            tracing::error!(filter = %self.subscription, "The MQTT broker refused the subscription.");
        } else {
            self.readiness.set(MQTT_SUBSCRIBED, true);
            tracing::info!(filter = %self.subscription, "Subscribed to MQTT telemetry.");
        }
    }

    fn hand_on(&self, publication: Publication, generation: u64) {
        let bytes = publication.payload.len() + publication.topic.len();
        let message = Message {
            generation,
            device_id: device_id_from_topic(&self.filter, &publication.topic).map(str::to_string),
            topic: publication.topic,
            pkid: publication.pkid,
            payload: publication.payload,
            original_bytes: publication.original_bytes,
            received_at: now_millis(),
            queued: Some(self.queue.charge(bytes)),
        };
        // Closed while shutting down: the message stays unacknowledged and the broker
        // redelivers it to the next bridge.
        let _ = self.sender.send(message);
    }
}

/// A connection's byte stream: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A packet read from the broker, as far as the bridge cares.
#[derive(Debug)]
enum Incoming {
    Publish(Publication),
    ConnAck(ConnAck),
    SubAck(SubAck),
    /// PINGRESP and anything else the bridge needs only to have heard.
    Other,
}

/// A PUBLISH packet, read whole or read through.
#[derive(Debug, PartialEq)]
struct Publication {
    topic: String,
    pkid: Option<u16>,
    payload: Bytes,
    /// The full payload size when only its first bytes were kept.
    original_bytes: Option<u64>,
}

/// A large PUBLISH being read through: what was kept of it, and how much is left to discard.
struct ReadThrough {
    publication: Publication,
    discard: usize,
}

/// Reads packets from the broker. Cancel-safe: everything read is kept in the buffer, so the
/// session can stop waiting for a packet (to write an acknowledgement) and wait again.
struct Reader {
    io: tokio::io::ReadHalf<Box<dyn Stream>>,
    buffer: BytesMut,
    /// Larger PUBLISH packets are read through, keeping their first bytes.
    max_packet: usize,
    through: Option<ReadThrough>,
}

impl Reader {
    fn new(io: tokio::io::ReadHalf<Box<dyn Stream>>, max_packet: usize) -> Self {
        Reader {
            io,
            buffer: BytesMut::with_capacity(8192),
            max_packet,
            through: None,
        }
    }

    /// The next packet.
    async fn next(&mut self) -> Result<Incoming, SessionError> {
        loop {
            if let Some(through) = &mut self.through {
                let discarded = through.discard.min(self.buffer.len());
                self.buffer.advance(discarded);
                through.discard -= discarded;
                if through.discard == 0 {
                    if let Some(done) = self.through.take() {
                        return Ok(Incoming::Publish(done.publication));
                    }
                }
                self.fill(1).await?;
                continue;
            }
            match decode(&mut self.buffer, self.max_packet)? {
                Decoded::Packet(incoming) => return Ok(incoming),
                Decoded::ReadThrough(through) => self.through = Some(through),
                Decoded::Need(bytes) => self.fill(bytes).await?,
            }
        }
    }

    /// Reads at least one more byte, with room for `wanted` more.
    async fn fill(&mut self, wanted: usize) -> Result<(), SessionError> {
        self.buffer.reserve(wanted.clamp(1, 64 * 1024).max(8192));
        match self.io.read_buf(&mut self.buffer).await? {
            0 => Err(SessionError::Closed),
            _ => Ok(()),
        }
    }
}

/// What the buffer holds.
#[derive(Debug)]
enum Decoded {
    Packet(Incoming),
    /// The start of a PUBLISH larger than the bridge reads whole; the rest is to be discarded.
    ReadThrough(ReadThrough),
    /// At least this many more bytes are needed.
    Need(usize),
}

impl std::fmt::Debug for ReadThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadThrough")
            .field("topic", &self.publication.topic)
            .field("discard", &self.discard)
            .finish()
    }
}

/// A packet's fixed header: its first byte, the header's length and the length of the rest.
/// `None` until enough bytes are there.
fn fixed_header(buffer: &[u8]) -> Result<Option<(u8, usize, usize)>, SessionError> {
    let Some(&first) = buffer.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for (index, byte) in buffer.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((first, index + 2, remaining)));
        }
    }
    if buffer.len() >= 5 {
        return Err(SessionError::Protocol(
            "a remaining length over 4 bytes".into(),
        ));
    }
    Ok(None)
}

/// Decodes the packet at the start of `buffer`, taking its bytes.
fn decode(buffer: &mut BytesMut, max_packet: usize) -> Result<Decoded, SessionError> {
    let Some((first, header_len, remaining)) = fixed_header(buffer)? else {
        return Ok(Decoded::Need(2));
    };
    let frame = header_len + remaining;
    if first >> 4 == PUBLISH {
        if frame > max_packet {
            return read_through(buffer, first, header_len, remaining);
        }
        if buffer.len() < frame {
            return Ok(Decoded::Need(frame - buffer.len()));
        }
        let mut packet = buffer.split_to(frame).freeze();
        packet.advance(header_len);
        let (topic, pkid, rest) = publish_header(first, &packet)?;
        let publication = Publication {
            topic,
            pkid,
            payload: packet.slice(rest..),
            original_bytes: None,
        };
        return Ok(Decoded::Packet(Incoming::Publish(publication)));
    }
    if frame > MAX_CONTROL_PACKET_BYTES {
        return Err(SessionError::Protocol(format!(
            "a packet of type {} and {frame} bytes",
            first >> 4
        )));
    }
    if buffer.len() < frame {
        return Ok(Decoded::Need(frame - buffer.len()));
    }
    match Packet::read(buffer, MAX_CONTROL_PACKET_BYTES) {
        Ok(Packet::ConnAck(connack)) => Ok(Decoded::Packet(Incoming::ConnAck(connack))),
        Ok(Packet::SubAck(suback)) => Ok(Decoded::Packet(Incoming::SubAck(suback))),
        Ok(_) => Ok(Decoded::Packet(Incoming::Other)),
        Err(error) => Err(SessionError::Protocol(error.to_string())),
    }
}

/// Starts reading through a PUBLISH larger than `max_packet` once its variable header and first
/// [`KEPT_PAYLOAD_BYTES`] are in the buffer.
fn read_through(
    buffer: &mut BytesMut,
    first: u8,
    header_len: usize,
    remaining: usize,
) -> Result<Decoded, SessionError> {
    let Some(length) = buffer.get(header_len..header_len + 2) else {
        return Ok(Decoded::Need(header_len + 2 - buffer.len()));
    };
    let topic_len = usize::from(u16::from_be_bytes([length[0], length[1]]));
    let id_len = if (first >> 1) & 3 > 0 { 2 } else { 0 };
    let variable = 2 + topic_len + id_len;
    let payload_len = remaining
        .checked_sub(variable)
        .ok_or_else(|| SessionError::Protocol("a PUBLISH shorter than its topic".into()))?;
    let kept = payload_len.min(KEPT_PAYLOAD_BYTES);
    let wanted = header_len + variable + kept;
    if buffer.len() < wanted {
        return Ok(Decoded::Need(wanted - buffer.len()));
    }
    let mut start = buffer.split_to(wanted).freeze();
    start.advance(header_len);
    let (topic, pkid, rest) = publish_header(first, &start)?;
    Ok(Decoded::ReadThrough(ReadThrough {
        publication: Publication {
            topic,
            pkid,
            // Copied, so the read buffer it came from is not held for as long as the message.
            payload: Bytes::copy_from_slice(&start[rest..]),
            original_bytes: Some(payload_len as u64),
        },
        discard: payload_len - kept,
    }))
}

/// A PUBLISH's topic and packet id, and where its payload starts in `packet` (the packet after
/// its fixed header).
fn publish_header(first: u8, packet: &[u8]) -> Result<(String, Option<u16>, usize), SessionError> {
    let malformed = || SessionError::Protocol("a malformed PUBLISH".into());
    let length = packet.get(..2).ok_or_else(malformed)?;
    let topic_end = 2 + usize::from(u16::from_be_bytes([length[0], length[1]]));
    let topic = packet.get(2..topic_end).ok_or_else(malformed)?;
    let topic = String::from_utf8_lossy(topic).into_owned();
    match (first >> 1) & 3 {
        0 => Ok((topic, None, topic_end)),
        1 => {
            let id = packet.get(topic_end..topic_end + 2).ok_or_else(malformed)?;
            Ok((
                topic,
                Some(u16::from_be_bytes([id[0], id[1]])),
                topic_end + 2,
            ))
        }
        // We subscribe with QoS 1; a broker never sends more.
        qos => Err(SessionError::Protocol(format!("a PUBLISH with QoS {qos}"))),
    }
}

/// Writes packets to the broker, acknowledgements batched.
struct Writer {
    io: tokio::io::WriteHalf<Box<dyn Stream>>,
    buffer: BytesMut,
}

impl Writer {
    fn new(io: tokio::io::WriteHalf<Box<dyn Stream>>) -> Self {
        Writer {
            io,
            buffer: BytesMut::with_capacity(4096),
        }
    }

    fn queue(&mut self, packet: &Packet) {
        if let Err(error) = packet.write(&mut self.buffer, usize::MAX) {
            tracing::warn!(%error, "Could not encode an MQTT packet.");
        }
    }

    /// Queues the acknowledgement if it belongs to this connection.
    fn queue_ack(&mut self, generation: u64, ack: &Ack) {
        if ack.generation == generation {
            self.queue(&Packet::PubAck(PubAck::new(ack.pkid)));
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), SessionError> {
        self.queue(packet);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        let write = async {
            self.io.write_all(&self.buffer).await?;
            self.io.flush().await
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
        self.buffer.clear();
        match written {
            Ok(result) => Ok(result?),
            Err(_) => Err(SessionError::WriteTimeout),
        }
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Checks the settings the session is built from, so a bad one fails start-up.
pub(crate) fn check(config: &BridgeConfig) -> Result<()> {
    if config.limits.mqtt_max_packet_bytes < 1024 {
        return Err(Error::InvalidSetting {
            setting: "TELEMETRY_MQTT_MAX_PACKET_BYTES / --mqtt-max-packet-bytes",
            problem: "must be at least 1024".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A PUBLISH packet's bytes.
    fn publish(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut packet = vec![(PUBLISH << 4) | (qos << 1)];
        let mut remaining = body.len();
        loop {
            let mut byte = u8::try_from(remaining % 128).unwrap();
            remaining /= 128;
            if remaining > 0 {
                byte |= 0x80;
            }
            packet.push(byte);
            if remaining == 0 {
                break;
            }
        }
        packet.extend_from_slice(&body);
        packet
    }

    /// Decodes `bytes` fed in pieces of `step`, as a socket may deliver them.
    fn decode_all(bytes: &[u8], step: usize, max_packet: usize) -> Vec<Publication> {
        let mut buffer = BytesMut::new();
        let mut through: Option<ReadThrough> = None;
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            buffer.extend_from_slice(piece);
            loop {
                if let Some(current) = &mut through {
                    let discarded = current.discard.min(buffer.len());
                    buffer.advance(discarded);
                    current.discard -= discarded;
                    if current.discard == 0 {
                        out.push(through.take().unwrap().publication);
                        continue;
                    }
                    break;
                }
                match decode(&mut buffer, max_packet).unwrap() {
                    Decoded::Packet(Incoming::Publish(publication)) => out.push(publication),
                    Decoded::Packet(other) => panic!("{other:?}"),
                    Decoded::ReadThrough(started) => through = Some(started),
                    Decoded::Need(_) => break,
                }
            }
        }
        out
    }

    #[test]
    fn publishes_of_every_size_are_decoded_the_large_ones_read_through() {
        let max_packet = 100_000;
        let large = vec![b'x'; 300_000];
        let mut stream = publish("devices/a/telemetry", 1, 7, b"{\"small\":1}");
        stream.extend(publish("devices/a/telemetry", 1, 8, &large));
        stream.extend(publish("devices/b/telemetry", 0, 0, b""));
        stream.extend(publish(
            "devices/a/telemetry",
            1,
            9,
            &vec![b'y'; max_packet - 30],
        ));
        for step in [1, 7, 4096, 1 << 20] {
            let decoded = decode_all(&stream, step, max_packet);
            assert_eq!(decoded.len(), 4, "step {step}");
            assert_eq!(decoded[0].payload.as_ref(), b"{\"small\":1}");
            assert_eq!(decoded[0].pkid, Some(7));
            assert_eq!(decoded[1].pkid, Some(8));
            assert_eq!(decoded[1].payload.len(), KEPT_PAYLOAD_BYTES);
            assert_eq!(decoded[1].original_bytes, Some(300_000));
            assert_eq!(decoded[2].pkid, None);
            assert_eq!(decoded[2].topic, "devices/b/telemetry");
            assert!(decoded[2].payload.is_empty());
            // A packet just within the limit is read whole.
            assert_eq!(decoded[3].original_bytes, None);
            assert_eq!(decoded[3].payload.len(), max_packet - 30);
        }
    }

    #[test]
    fn malformed_packets_are_protocol_errors_not_panics() {
        for bytes in [
            vec![0x32, 0x01, 0x00],             // QoS 1 PUBLISH, topic length cut
            vec![0x32, 0x03, 0x00, 0x05, b'a'], // topic longer than the packet
            vec![0x34, 0x02, 0x00, 0x00],       // QoS 2
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            let mut buffer = BytesMut::from(&bytes[..]);
            assert!(
                matches!(decode(&mut buffer, 1_000), Err(SessionError::Protocol(_))),
                "{bytes:?}"
            );
        }
        // A large packet whose topic length runs past its end.
        let mut buffer = BytesMut::from(&[0x30, 0x80, 0x80, 0x01, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut buffer, 1_000),
            Err(SessionError::Protocol(_)) | Ok(Decoded::Need(_))
        ));
    }

    #[tokio::test]
    async fn a_byte_bound_waits_for_room() {
        let bound = ByteBound::new(10, metrics::gauge!("test_bound_bytes"));
        let charge = bound.charge(10);
        assert!(!bound.has_room());
        let waiter = tokio::spawn({
            let bound = bound.clone();
            async move { bound.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(charge);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(bound.has_room());
    }

    #[test]
    fn device_id_is_the_segment_under_the_plus() {
        assert_eq!(
            device_id_from_topic("devices/+/telemetry", "devices/pico-1/telemetry"),
            Some("pico-1")
        );
        assert_eq!(
            device_id_from_topic("t1/devices/+/telemetry", "t1/devices/x/telemetry"),
            Some("x")
        );
        assert_eq!(device_id_from_topic("devices/#", "devices/a/b"), None);
        assert_eq!(
            device_id_from_topic("devices/+/telemetry", "devices//telemetry"),
            None
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::DEFAULT_MQTT_MAX_PACKET_BYTES;

    /// The broker's packet limit is one setting: the shipped Mosquitto configuration says the
    /// bridge's default.
    #[test]
    fn the_shipped_mosquitto_configuration_agrees_with_the_bridge() {
        let config = include_str!("../../../deploy/mosquitto/mosquitto.conf");
        let limit = config
            .lines()
            .find_map(|line| line.trim().strip_prefix("max_packet_size "))
            .and_then(|value| value.trim().parse::<usize>().ok());
        assert_eq!(limit, Some(DEFAULT_MQTT_MAX_PACKET_BYTES));
    }
}

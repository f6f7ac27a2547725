//! The DNS server: questions under the cluster domain (and reverse names in the cluster's ranges)
//! answered from the [`Zone`], the rest forwarded to upstream resolvers through a cache, over UDP
//! and TCP (hickory-server). A UDP answer larger than the client can take (512 bytes without
//! EDNS, its advertised size with it) is sent truncated, so the client asks again over TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use ipnetwork::IpNetwork;
use tokio_util::sync::CancellationToken;

use crate::zone::{Answer, Zone};

/// The size of a UDP answer to a client without EDNS (RFC 1035).
pub const UDP_PLAIN_MAX: usize = 512;
/// How long a TCP client may stay idle.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// The zone as the server and the watches share it.
pub type SharedZone = Arc<RwLock<Zone>>;

/// The forwarder to the upstream resolvers, with its cache.
#[derive(Clone)]
pub struct Forwarder {
    resolver: TokioResolver,
}

impl Forwarder {
    /// A forwarder to `upstreams` (each asked over UDP, and TCP for truncated answers), caching
    /// up to `cache_size` answers for their TTLs.
    pub fn new(upstreams: &[SocketAddr], cache_size: usize) -> Forwarder {
        let mut config = ResolverConfig::new();
        for upstream in upstreams {
            config.add_name_server(NameServerConfig::new(*upstream, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*upstream, Protocol::Tcp));
        }
        let mut options = ResolverOpts::default();
        options.cache_size = cache_size;
        // The client's names are asked as they are: no search list, no hosts file of the
        // server's own, CNAME chains kept in the answer.
        options.ndots = 0;
        options.use_hosts_file = ResolveHosts::Never;
        options.preserve_intermediates = true;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(options)
                .build();
        Forwarder { resolver }
    }

    /// The upstreams' answer: the response code, the answer records and the authority's SOA.
    async fn ask(&self, name: Name, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        match self.resolver.lookup(name, qtype).await {
            Ok(lookup) => (ResponseCode::NoError, lookup.records().to_vec(), Vec::new()),
            Err(error) if error.is_no_records_found() => {
                let code = if error.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let soa = error
                    .into_soa()
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default();
                (code, Vec::new(), soa)
            }
            Err(error) => {
                tracing::debug!(%error, "upstream resolvers did not answer");
                (ResponseCode::ServFail, Vec::new(), Vec::new())
            }
        }
    }
}

/// Answers one question after another: see the module docs.
pub struct Handler {
    zone: SharedZone,
    forwarder: Option<Forwarder>,
    /// Who may have names outside the cluster resolved (an open resolver on a node's address
    /// would serve anyone who can reach it).
    recursion_from: Vec<IpNetwork>,
}

impl Handler {
    /// A handler answering from `zone`, forwarding to `forwarder` (none: other names are
    /// refused) for clients in `recursion_from`.
    pub fn new(
        zone: SharedZone,
        forwarder: Option<Forwarder>,
        recursion_from: Vec<IpNetwork>,
    ) -> Handler {
        Handler {
            zone,
            forwarder,
            recursion_from,
        }
    }

    /// What upstream says of `name`, for a client in `--recursion-from`; REFUSED for others and
    /// without upstream resolvers.
    async fn upstream(
        &self,
        name: &Name,
        qtype: RecordType,
        client: IpAddr,
    ) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        match &self.forwarder {
            Some(forwarder) if self.recursion_from.iter().any(|n| n.contains(client)) => {
                forwarder.ask(name.clone(), qtype).await
            }
            _ => (ResponseCode::Refused, Vec::new(), Vec::new()),
        }
    }

    /// What the zone says of `query`, before anything is asked upstream.
    fn local(&self, query: &Query) -> Local {
        let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
        match zone.lookup(query.name(), query.query_type()) {
            Answer::Forward => Local::Forward,
            Answer::NxDomain => Local::Answered(Sections {
                code: ResponseCode::NXDomain,
                authoritative: true,
                answers: Vec::new(),
                authority: vec![zone.soa()],
                additionals: Vec::new(),
            }),
            Answer::Found {
                answers,
                additionals,
            } => {
                // An ExternalName's CNAME comes with its target's records, as CoreDNS gives
                // them: stub resolvers do not follow a chain themselves.
                let target = match answers.as_slice() {
                    [only] if query.query_type() != RecordType::CNAME => match only.data() {
                        RData::CNAME(target) => Some(target.0.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                let sections = Sections {
                    code: ResponseCode::NoError,
                    authoritative: true,
                    authority: if answers.is_empty() {
                        vec![zone.soa()]
                    } else {
                        Vec::new()
                    },
                    answers,
                    additionals,
                };
                match target {
                    Some(target) => Local::Follow(sections, target),
                    None => Local::Answered(sections),
                }
            }
        }
    }

    /// The answer once `local` is known: a CNAME's target's records added (from the zone, or
    /// from upstream; a target that is a CNAME again is not followed further, upstream follows
    /// its own), or the question forwarded.
    async fn finish(&self, local: Local, query: &Query, client: IpAddr) -> Sections {
        match local {
            Local::Answered(sections) => sections,
            Local::Follow(mut sections, target) => {
                let found = {
                    let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
                    match zone.lookup(&target, query.query_type()) {
                        Answer::Found { answers, .. } => Some(answers),
                        Answer::NxDomain => Some(Vec::new()),
                        Answer::Forward => None,
                    }
                };
                let records = match found {
                    Some(records) => records,
                    None => self.upstream(&target, query.query_type(), client).await.1,
                };
                sections.answers.extend(records);
                sections
            }
            Local::Forward => {
                let (code, answers, authority) = self
                    .upstream(query.name(), query.query_type(), client)
                    .await;
                Sections {
                    code,
                    authoritative: false,
                    answers,
                    authority,
                    additionals: Vec::new(),
                }
            }
        }
    }

    /// The response code and sections for `query` from `client`.
    async fn answer(&self, query: &Query, client: IpAddr) -> Sections {
        self.finish(self.local(query), query, client).await
    }
}

/// What the zone says of a question, before anything is asked upstream.
enum Local {
    /// Answered from the zone.
    Answered(Sections),
    /// An ExternalName's CNAME, to come with the records of its target.
    Follow(Sections, Name),
    /// Not the zone's: for upstream.
    Forward,
}

/// A response's code and records.
struct Sections {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additionals: Vec<Record>,
}

impl Sections {
    /// Whether the response, encoded, fits in `limit` bytes: sure when an upper bound of its
    /// size (no name compression) does, else encoded to know.
    fn fits(&self, header: &Header, query: &Query, limit: usize) -> bool {
        let name = |n: &Name| n.len() + 2;
        let bound = 12
            + name(query.name())
            + 4
            + self
                .answers
                .iter()
                .chain(&self.authority)
                .chain(&self.additionals)
                .map(|r| {
                    name(r.name())
                        + 10
                        + match r.data() {
                            RData::A(_) => 4,
                            RData::AAAA(_) => 16,
                            RData::CNAME(n) => name(&n.0),
                            RData::PTR(n) => name(&n.0),
                            RData::SRV(srv) => 6 + name(srv.target()),
                            RData::SOA(soa) => name(soa.mname()) + name(soa.rname()) + 20,
                            _ => limit,
                        }
                })
                .sum::<usize>();
        if bound <= limit {
            return true;
        }
        let mut message = Message::new();
        message.set_header(*header);
        message.add_query(query.clone());
        message.insert_answers(self.answers.clone());
        message.insert_name_servers(self.authority.clone());
        message.insert_additionals(self.additionals.clone());
        message.to_vec().is_ok_and(|bytes| bytes.len() <= limit)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(self.forwarder.is_some());
        let edns = request.edns().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns
        });
        if let Some(edns) = &edns {
            builder.edns(edns.clone());
        }
        let query = match request.request_info() {
            Ok(info)
                if request.message_type() == MessageType::Query
                    && request.op_code() == OpCode::Query =>
            {
                info.query.original().clone()
            }
            Ok(_) => {
                header.set_response_code(ResponseCode::NotImp);
                return send(&mut response_handle, builder.build_no_records(header)).await;
            }
            Err(_) => {
                header.set_response_code(ResponseCode::FormErr);
                return send(&mut response_handle, builder.build_no_records(header)).await;
            }
        };
        // TCP only (UDP has its own receivers): no size limit to keep.
        let sections = self.answer(&query, request.src().ip()).await;
        header.set_response_code(sections.code);
        header.set_authoritative(sections.authoritative);
        let response = builder.build(
            header,
            sections.answers.iter(),
            std::iter::empty(),
            sections.authority.iter(),
            sections.additionals.iter(),
        );
        send(&mut response_handle, response).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "cannot send a DNS response");
            let mut header = Header::new();
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        }
    }
}

/// The UDP response to `request` with `sections`: the request's id, flags and question, EDNS
/// echoed with its payload size; larger than the client takes (512 bytes without EDNS), it goes
/// out truncated and empty, and the client asks again over TCP.
fn udp_response(
    request: &Message,
    query: &Query,
    mut sections: Sections,
    recursion: bool,
) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(recursion);
    header.set_response_code(sections.code);
    header.set_authoritative(sections.authoritative);
    let limit = request
        .extensions()
        .as_ref()
        .map_or(UDP_PLAIN_MAX, |e| usize::from(e.max_payload().max(512)));
    if !sections.fits(&header, query, limit) {
        header.set_truncated(true);
        sections.answers.clear();
        sections.authority.clear();
        sections.additionals.clear();
    }
    let mut message = Message::new();
    message.set_header(header);
    message.add_query(query.clone());
    message.insert_answers(sections.answers);
    message.insert_name_servers(sections.authority);
    message.insert_additionals(sections.additionals);
    if let Some(asked) = request.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload().max(512));
        message.set_edns(edns);
    }
    message.to_vec().unwrap_or_default()
}

/// A response with only a header: `code` for `request`.
fn udp_error(request: &Message, code: ResponseCode) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header.set_response_code(code);
    let mut message = Message::new();
    message.set_header(header);
    message.to_vec().unwrap_or_default()
}

/// One UDP receiver: each query the zone can answer is answered on the spot (no task, no
/// channel: the cost of a cluster name is the lookup and two syscalls, as in dnsmasq); a query
/// that needs upstream gets a task of its own.
async fn serve_udp(handler: Arc<Handler>, socket: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(error) => {
                tracing::debug!(%error, "UDP receive failed");
                continue;
            }
        };
        let Ok(request) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if request.message_type() != MessageType::Query {
            continue;
        }
        let query = match request.queries() {
            [query] if request.op_code() == OpCode::Query => query.clone(),
            [_] => {
                let _ = socket
                    .send_to(&udp_error(&request, ResponseCode::NotImp), src)
                    .await;
                continue;
            }
            _ => {
                let _ = socket
                    .send_to(&udp_error(&request, ResponseCode::FormErr), src)
                    .await;
                continue;
            }
        };
        let recursion = handler.forwarder.is_some();
        match handler.local(&query) {
            Local::Answered(sections) => {
                let bytes = udp_response(&request, &query, sections, recursion);
                let _ = socket.send_to(&bytes, src).await;
            }
            local => {
                let (handler, socket) = (handler.clone(), socket.clone());
                tokio::spawn(async move {
                    let sections = handler.finish(local, &query, src.ip()).await;
                    let bytes = udp_response(&request, &query, sections, recursion);
                    let _ = socket.send_to(&bytes, src).await;
                });
            }
        }
    }
}

/// The handler as hickory-server takes it (TCP).
struct Shared(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0.handle_request(request, response_handle).await
    }
}

/// UDP receivers per socket (each answers zone queries inline).
const UDP_RECEIVERS: usize = 4;

/// Serves `handler` on `udp` (its own receivers) and `tcp` (hickory-server) until `shutdown`.
pub async fn serve(
    handler: Handler,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), hickory_proto::ProtoError> {
    let handler = Arc::new(handler);
    let udp = Arc::new(udp);
    let mut receivers = tokio::task::JoinSet::new();
    for _ in 0..UDP_RECEIVERS {
        receivers.spawn(serve_udp(handler.clone(), udp.clone()));
    }
    let mut server = ServerFuture::new(Shared(handler));
    server.register_listener(tcp, TCP_TIMEOUT);
    let result = tokio::select! {
        result = server.block_until_done() => result,
        () = shutdown.cancelled() => server.shutdown_gracefully().await,
    };
    receivers.abort_all();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use serde_json::json;
    use skiff_common::watch::Change;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::objects::{DnsService, DnsSlice};

    /// A zone for `domain` with `web` (a ClusterIP Service) and `many` (headless, 40 endpoints).
    fn zone(domain: &str) -> SharedZone {
        let mut zone =
            Zone::new(domain, 5, vec!["10.96.0.0/12".parse().expect("a range")]).expect("a zone");
        let service = |v| Arc::new(serde_json::from_value::<DnsService>(v).expect("a Service"));
        zone.apply_service(Change::Resynced(vec![
            service(json!({"metadata": {"namespace": "ns", "name": "web"},
                           "spec": {"clusterIP": "10.96.0.20"}})),
            service(json!({"metadata": {"namespace": "ns", "name": "many"},
                           "spec": {"clusterIP": "None"}})),
        ]));
        let endpoints: Vec<_> = (0..40)
            .map(|i| json!({"addresses": [format!("10.244.0.{}", i + 1)]}))
            .collect();
        zone.apply_slice(Change::Applied(Arc::new(
            serde_json::from_value::<DnsSlice>(json!({
                "metadata": {"namespace": "ns", "name": "many-1",
                             "labels": {"kubernetes.io/service-name": "many"}},
                "addressType": "IPv4", "endpoints": endpoints}))
            .expect("a slice"),
        )));
        Arc::new(RwLock::new(zone))
    }

    /// A server for `zone` on 127.0.0.1 (UDP and TCP on one port); its address.
    async fn start(
        zone: SharedZone,
        forwarder: Option<Forwarder>,
        recursion_from: &str,
        shutdown: &CancellationToken,
    ) -> SocketAddr {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a TCP port");
        let addr = tcp.local_addr().expect("its address");
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .expect("the same UDP port");
        let handler = Handler::new(
            zone,
            forwarder,
            vec![recursion_from.parse().expect("a range")],
        );
        tokio::spawn(serve(handler, udp, tcp, shutdown.clone()));
        addr
    }

    fn question(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(7);
        message.set_recursion_desired(true);
        message.add_query(Query::query(Name::from_ascii(name).expect("a name"), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            message.set_edns(e);
        }
        message.to_vec().expect("encodes")
    }

    async fn udp(
        server: SocketAddr,
        name: &str,
        qtype: RecordType,
        edns: Option<u16>,
    ) -> (Message, usize) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a socket");
        socket
            .send_to(&question(name, qtype, edns), server)
            .await
            .expect("sent");
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("received");
        (Message::from_vec(&buf[..n]).expect("decodes"), n)
    }

    async fn tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
        let mut stream = tokio::net::TcpStream::connect(server)
            .await
            .expect("connects");
        let q = question(name, qtype, None);
        let mut framed = u16::try_from(q.len())
            .expect("short")
            .to_be_bytes()
            .to_vec();
        framed.extend(q);
        stream.write_all(&framed).await.expect("sent");
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.expect("a length");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.expect("the answer");
        Message::from_vec(&buf).expect("decodes")
    }

    /// The answer section's data.
    fn data(message: &Message) -> Vec<RData> {
        message.answers().iter().map(|r| r.data().clone()).collect()
    }

    #[tokio::test]
    async fn answers_nxdomain_and_no_data_come_with_the_zones_soa() {
        let shutdown = CancellationToken::new();
        let server = start(zone("cluster.local"), None, "127.0.0.0/8", &shutdown).await;
        let (answer, _) = udp(server, "web.ns.svc.cluster.local.", RecordType::A, None).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.authoritative());
        assert_eq!(
            data(&answer),
            [RData::A(Ipv4Addr::new(10, 96, 0, 20).into())]
        );
        let (missing, _) = udp(server, "gone.ns.svc.cluster.local.", RecordType::A, None).await;
        assert_eq!(missing.response_code(), ResponseCode::NXDomain);
        assert_eq!(missing.name_servers()[0].record_type(), RecordType::SOA);
        let (no_data, _) = udp(server, "web.ns.svc.cluster.local.", RecordType::AAAA, None).await;
        assert_eq!(no_data.response_code(), ResponseCode::NoError);
        assert!(no_data.answers().is_empty());
        assert_eq!(no_data.name_servers()[0].record_type(), RecordType::SOA);
        // No upstream: other names are refused.
        let (refused, _) = udp(server, "example.org.", RecordType::A, None).await;
        assert_eq!(refused.response_code(), ResponseCode::Refused);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn large_answers_are_truncated_over_udp_without_edns_and_whole_over_tcp() {
        let shutdown = CancellationToken::new();
        let server = start(zone("cluster.local"), None, "127.0.0.0/8", &shutdown).await;
        let name = "many.ns.svc.cluster.local.";
        let (plain, size) = udp(server, name, RecordType::A, None).await;
        assert!(plain.truncated(), "40 A records do not fit in 512 bytes");
        assert!(size <= UDP_PLAIN_MAX, "{size} bytes");
        let (with_edns, size) = udp(server, name, RecordType::A, Some(4096)).await;
        assert!(!with_edns.truncated());
        assert_eq!(with_edns.answers().len(), 40, "{size} bytes");
        let whole = tcp(server, name, RecordType::A).await;
        assert!(!whole.truncated());
        assert_eq!(whole.answers().len(), 40);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn other_names_are_forwarded_for_allowed_clients_only() {
        let shutdown = CancellationToken::new();
        // The upstream: another server, authoritative for `upstream.test`.
        let upstream = start(zone("upstream.test"), None, "127.0.0.0/8", &shutdown).await;
        let forwarder = Forwarder::new(&[upstream], 100);
        let cluster = zone("cluster.local");
        let server = start(
            cluster.clone(),
            Some(forwarder.clone()),
            "127.0.0.0/8",
            &shutdown,
        )
        .await;
        let (answer, _) = udp(server, "web.ns.svc.upstream.test.", RecordType::A, None).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(!answer.authoritative());
        assert!(answer.recursion_available());
        assert_eq!(
            data(&answer),
            [RData::A(Ipv4Addr::new(10, 96, 0, 20).into())]
        );
        let (missing, _) = udp(server, "gone.ns.svc.upstream.test.", RecordType::A, None).await;
        assert_eq!(missing.response_code(), ResponseCode::NXDomain);
        // The cluster's own names are never forwarded.
        let (own, _) = udp(server, "web.ns.svc.cluster.local.", RecordType::A, None).await;
        assert!(own.authoritative());
        // An ExternalName comes with its target's records, from upstream.
        {
            let mut zone = cluster.write().expect("the zone");
            zone.apply_service(Change::Applied(Arc::new(
                serde_json::from_value::<DnsService>(json!({
                    "metadata": {"namespace": "ns", "name": "ext"},
                    "spec": {"type": "ExternalName", "externalName": "web.ns.svc.upstream.test"}}))
                .expect("a Service"),
            )));
        }
        let (followed, _) = udp(server, "ext.ns.svc.cluster.local.", RecordType::A, None).await;
        assert_eq!(
            followed
                .answers()
                .iter()
                .map(|r| r.record_type())
                .collect::<Vec<_>>(),
            [RecordType::CNAME, RecordType::A],
            "{followed:?}"
        );
        // A client outside the allowed ranges gets REFUSED for other names.
        let closed = start(
            zone("cluster.local"),
            Some(forwarder),
            "10.0.0.0/8",
            &shutdown,
        )
        .await;
        let (refused, _) = udp(closed, "web.ns.svc.upstream.test.", RecordType::A, None).await;
        assert_eq!(refused.response_code(), ResponseCode::Refused);
        let (own, _) = udp(closed, "web.ns.svc.cluster.local.", RecordType::A, None).await;
        assert_eq!(own.response_code(), ResponseCode::NoError);
        shutdown.cancel();
    }
}

package ingest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// rawCoAP sends hand-built CoAP messages over UDP, so a test controls every
// token and option (go-coap's client would do block-wise its own way).
type rawCoAP struct {
	t   testing.TB
	c   *net.UDPConn
	mid uint16
}

func dialRawCoAP(t testing.TB, addr string) *rawCoAP {
	t.Helper()
	ra, err := net.ResolveUDPAddr("udp", addr)
	require.NoError(t, err)
	c, err := net.DialUDP("udp", nil, ra)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &rawCoAP{t: t, c: c, mid: 100}
}

// reply is what came back: code, options and diagnostic payload.
type reply struct {
	code codes.Code
	opts message.Options
	diag string
}

func (r reply) uint(id message.OptionID) (uint32, bool) {
	v, err := r.opts.GetUint32(id)
	return v, err == nil
}

// post sends one confirmable POST to /devices/<dev>/readings?key=<key> with
// the given token and extra options, and returns the piggybacked answer.
func (c *rawCoAP) post(dev, key string, token []byte, body []byte, extra ...message.Option) reply {
	c.t.Helper()
	c.send(c.request(dev, key, token, body, extra...))
	return c.await(c.mid, token, 5*time.Second)
}

// request encodes the next confirmable POST (a new message id).
func (c *rawCoAP) request(dev, key string, token []byte, body []byte, extra ...message.Option) []byte {
	c.t.Helper()
	c.mid++
	opts := message.Options{
		{ID: message.URIPath, Value: []byte("devices")}, {ID: message.URIPath, Value: []byte(dev)},
		{ID: message.URIPath, Value: []byte("readings")},
		{ID: message.ContentFormat, Value: []byte{byte(message.AppSenmlJSON)}},
		{ID: message.URIQuery, Value: []byte("key=" + key)},
	}
	opts = append(opts, extra...)
	sort.SliceStable(opts, func(i, j int) bool { return opts[i].ID < opts[j].ID })
	m := message.Message{Token: token, Code: codes.POST, Type: message.Confirmable, MessageID: int32(c.mid), Options: opts, Payload: body}
	buf := make([]byte, 2048)
	n, err := coder.DefaultCoder.Encode(m, buf)
	require.NoError(c.t, err)
	return buf[:n]
}

func (c *rawCoAP) send(datagram []byte) {
	c.t.Helper()
	_, err := c.c.Write(datagram)
	require.NoError(c.t, err)
}

// await returns the answer to message mid, which must come within d.
func (c *rawCoAP) await(mid uint16, token []byte, d time.Duration) reply {
	c.t.Helper()
	buf := make([]byte, 2048)
	require.NoError(c.t, c.c.SetReadDeadline(time.Now().Add(d)))
	for {
		n, err := c.c.Read(buf)
		require.NoError(c.t, err, "an answer to message %d", mid)
		resp := message.Message{Options: make(message.Options, 0, 16)}
		_, err = coder.DefaultCoder.Decode(buf[:n], &resp)
		require.NoError(c.t, err)
		if resp.MessageID == int32(mid) {
			require.Equal(c.t, token, []byte(resp.Token), "the answer carries the request's token")
			return reply{code: resp.Code, opts: resp.Options, diag: string(resp.Payload)}
		}
	}
}

func block1(num int64, more bool) message.Option {
	v, err := blockwise.EncodeBlockOption(blockwise.SZX1024, num, more)
	if err != nil {
		panic(err)
	}
	return message.Option{ID: message.Block1, Value: uintBytes(v)}
}

func requestTag(tag string) message.Option {
	return message.Option{ID: optionRequestTag, Value: []byte(tag)}
}

// senml returns a SenML pack of n pressure readings with values from+0 ..
// from+n-1, padded to a whole number of 1024-byte blocks plus a short last one.
func senml(from, n int) []byte {
	var b strings.Builder
	b.WriteByte('[')
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"n":"pressure","v":%d}`, from+i)
	}
	b.WriteByte(']')
	return []byte(b.String())
}

func blocksOf(body []byte) [][]byte {
	var out [][]byte
	for len(body) > 1024 {
		out = append(out, body[:1024])
		body = body[1024:]
	}
	return append(out, body)
}

func values(t *testing.T, rec *recorder) []int {
	t.Helper()
	var vs []int
	for _, r := range rec.readings() {
		vs = append(vs, int(r.Value))
	}
	sort.Ints(vs)
	return vs
}

func seq(from, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = from + i
	}
	return out
}

// RFC 7959 §2.4 lets a client use a new token for every block (libcoap does):
// the blocks of one body are matched by endpoint, URI and Request-Tag.
func TestCoAPBlock1WithANewTokenPerBlock(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	body := senml(0, 300)
	blocks := blocksOf(body)
	require.Greater(t, len(blocks), 5)
	for i, b := range blocks {
		more := i < len(blocks)-1
		r := c.post("pipe-0001", "secret-pipe-0001", []byte{byte(i), 0xAB}, b, block1(int64(i), more), requestTag("t1"))
		if more {
			require.Equal(t, codes.Continue, r.code, "block %d: %s", i, r.diag)
		} else {
			require.Equal(t, codes.Changed, r.code, "last block: %s", r.diag)
		}
		v, ok := r.uint(message.Block1)
		require.True(t, ok, "the answer echoes Block1")
		_, num, m, err := blockwise.DecodeBlockOption(v)
		require.NoError(t, err)
		require.Equal(t, int64(i), num)
		require.Equal(t, more, m)
	}
	require.Equal(t, seq(0, 300), values(t, rec), "every reading of the body, once")
}

// Two bodies to the same URI from the same endpoint, interleaved, are told
// apart by their Request-Tag.
func TestCoAPBlock1BodiesAreToldApartByRequestTag(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	a, b := blocksOf(senml(0, 100)), blocksOf(senml(1000, 100))
	require.Equal(t, len(a), len(b))
	tok := byte(0)
	for i := range a {
		more := i < len(a)-1
		for _, x := range []struct {
			tag    string
			blocks [][]byte
		}{{"a", a}, {"b", b}} {
			tok++
			r := c.post("pipe-0001", "secret-pipe-0001", []byte{tok}, x.blocks[i], block1(int64(i), more), requestTag(x.tag))
			require.Contains(t, []codes.Code{codes.Continue, codes.Changed}, r.code, "body %s block %d: %s", x.tag, i, r.diag)
		}
	}
	require.Equal(t, append(seq(0, 100), seq(1000, 100)...), values(t, rec))
}

func TestCoAPBlock1RefusesGapsAndOversizedBodies(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	full := bytes.Repeat([]byte(" "), 1024)

	r := c.post("pipe-0001", "secret-pipe-0001", []byte{1}, full, block1(0, true), requestTag("gap"))
	require.Equal(t, codes.Continue, r.code)
	r = c.post("pipe-0001", "secret-pipe-0001", []byte{2}, full, block1(2, true), requestTag("gap"))
	require.Equal(t, codes.RequestEntityIncomplete, r.code, "block 1 is missing: %s", r.diag)

	r = c.post("pipe-0001", "secret-pipe-0001", []byte{3}, full, block1(0, true), requestTag("big"),
		message.Option{ID: message.Size1, Value: uintBytes(1 << 20)})
	require.Equal(t, codes.RequestEntityTooLarge, r.code, "Size1 announces a body over the limit")
	max, ok := r.uint(message.Size1)
	require.True(t, ok, "4.13 says the largest body in Size1")
	require.Positive(t, max)

	r = c.post("pipe-0001", "secret-pipe-0001", []byte{4}, full, block1(int64(max)/1024, true), requestTag("far"))
	require.Equal(t, codes.RequestEntityTooLarge, r.code, "a block beyond the limit: %s", r.diag)
	require.Empty(t, rec.readings())
}

// An unfinished upload holds memory until it expires: one source may hold
// only max_uploads_per_source of them; the next is refused with 5.03 and
// Max-Age, while other sources are still served.
func TestCoAPBoundsUnfinishedUploadsPerSource(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	perSource := DefaultBlockwise().MaxUploadsPerSource
	c := dialRawCoAP(t, s.Addr().String())
	full := bytes.Repeat([]byte(" "), 1024)
	for i := range perSource {
		r := c.post("pipe-0001", "secret-pipe-0001", []byte{byte(i)}, full, block1(0, true), requestTag(fmt.Sprint(i)))
		require.Equal(t, codes.Continue, r.code, "upload %d: %s", i, r.diag)
	}
	r := c.post("pipe-0001", "secret-pipe-0001", []byte{0xFF}, full, block1(0, true), requestTag("one too many"))
	require.Equal(t, codes.ServiceUnavailable, r.code, "%s", r.diag)
	age, ok := r.uint(message.MaxAge)
	require.True(t, ok)
	require.Positive(t, age)

	// Another source (127.0.0.2: Linux routes all of 127/8 to loopback) is
	// not held up by the first one's uploads.
	oc, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)}, s.Addr().(*net.UDPAddr))
	require.NoError(t, err)
	t.Cleanup(func() { oc.Close() })
	other := &rawCoAP{t: t, c: oc, mid: 500}
	r = other.post("pipe-0001", "secret-pipe-0001", []byte{1}, full, block1(0, true), requestTag("x"))
	require.Equal(t, codes.Continue, r.code, "another source is served: %s", r.diag)
}

// The same question answered for an unknown device and for a known one with
// a wrong (or no) key must look the same: same code, same text.
func TestCoAPUnknownDeviceAndWrongKeyLookTheSame(t *testing.T) {
	rec := &recorder{}
	s := startCoAP(t, rec)
	c := dialRawCoAP(t, s.Addr().String())
	body := senml(1, 1)
	unknown := c.post("pipe-9999", "secret-pipe-9999", []byte{1}, body)
	wrong := c.post("pipe-0001", "secret-pipe-9999", []byte{2}, body)
	none := c.post("pipe-0001", "", []byte{3}, body)
	require.Equal(t, codes.Unauthorized, unknown.code)
	require.Equal(t, unknown, wrong, "unknown device and wrong key answer alike")
	require.Equal(t, unknown, none, "unknown device and missing key answer alike")
	require.Empty(t, rec.readings())
}

// libcoap's client sends a body in blocks with a new token per block (RFC 7959
// allows it): every reading of a body of several blocks must be journaled.
func TestCoAPBlockwiseUploadFromLibcoap(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts libcoap's coap-client-notls")
	}
	bin, err := exec.LookPath("coap-client-notls")
	if err != nil {
		t.Fatal("coap-client-notls not found: run `make deps` (installs Debian's libcoap3-bin)")
	}
	rec := &recorder{}
	s := startCoAP(t, rec)
	body := senml(0, 400)
	require.Greater(t, len(body), 8*1024, "a body of several blocks")
	f := filepath.Join(t.TempDir(), "big.json")
	require.NoError(t, os.WriteFile(f, body, 0o600))
	port := s.Addr().(*net.UDPAddr).Port
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	uri := fmt.Sprintf("coap://127.0.0.1:%d/devices/pipe-0001/readings?key=secret-pipe-0001", port)
	out, err := exec.CommandContext(ctx, bin, "-m", "post", "-b", "1024", "-t", "110", "-f", f, uri).CombinedOutput()
	require.NoError(t, err, "coap-client-notls: %s", out)
	require.NotContains(t, string(out), "4.", "no error answer: %s", out)
	require.Equal(t, seq(0, 400), values(t, rec), "every reading of the body, once")
}

// Over DTLS-PSK, a handshake with an unknown identity must fail exactly as one
// with a known identity and a wrong key, or device ids can be enumerated.
func TestDTLSUnknownIdentityFailsLikeAWrongKey(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0", DTLSAddr: "127.0.0.1:0"}, testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, s)
	handshake := func(id, key string) error {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		defer pc.Close()
		conn, err := piondtls.ClientWithOptions(pc, s.DTLSAddr(),
			piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte(key), nil }),
			piondtls.WithPSKIdentityHint([]byte(id)),
			piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_CCM_8))
		require.NoError(t, err)
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		return conn.HandshakeContext(ctx)
	}
	require.NoError(t, handshake("pipe-0001", "secret-pipe-0001"), "the right key gets a session")
	var wrong, unknown error
	done := make(chan struct{})
	go func() { defer close(done); wrong = handshake("pipe-0001", "not-the-key") }()
	unknown = handshake("pipe-9999", "not-the-key")
	<-done
	require.Error(t, wrong)
	require.Error(t, unknown)
	require.Equal(t, wrong.Error(), unknown.Error(), "an unknown identity fails like a wrong key")
}

// go-coap's own client sends a large body block-wise (one token for all
// blocks), over UDP and over DTLS: both are reassembled.
func TestCoAPBlockwiseFromGoCoapClients(t *testing.T) {
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	reg := prometheus.NewRegistry()
	s, err := NewCoAP(CoAPConfig{Enabled: true, Addr: "127.0.0.1:0", DTLSAddr: "127.0.0.1:0"}, testRegistry(t), h, nil, reg)
	require.NoError(t, err)
	runGateway(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	var runners sync.WaitGroup
	defer func() { cancel(); runners.Wait() }()
	runner := options.WithPeriodicRunner(ownedRunner(ctx, &runners))

	uc, err := udp.Dial(s.Addr().String(), runner)
	require.NoError(t, err)
	resp, err := uc.Post(ctx, "/devices/pipe-0001/readings", message.AppSenmlJSON, bytes.NewReader(senml(0, 300)),
		message.Option{ID: message.URIQuery, Value: []byte("key=secret-pipe-0001")})
	require.NoError(t, err)
	require.Equal(t, codes.Changed, resp.Code())
	require.NoError(t, uc.Close())
	<-uc.Done()

	dc, err := dtls.Dial(s.DTLSAddr().String(), dtls.NewDTLSClientOptions(
		piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte("secret-pipe-0002"), nil }),
		piondtls.WithPSKIdentityHint([]byte("pipe-0002")),
		piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_CCM_8)), runner)
	require.NoError(t, err)
	resp, err = dc.Post(ctx, "/devices/pipe-0002/readings", message.AppSenmlJSON, bytes.NewReader(senml(1000, 300)))
	require.NoError(t, err)
	require.Equal(t, codes.Changed, resp.Code())
	require.NoError(t, dc.Close())
	<-dc.Done()
	require.Equal(t, append(seq(0, 300), seq(1000, 300)...), values(t, rec))
	require.GreaterOrEqual(t, testutil.ToFloat64(s.m.requests.WithLabelValues(codes.Continue.String())), 10.0,
		"the bodies came in blocks")
}

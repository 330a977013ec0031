package ingest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// dialFrom opens a TCP connection to addr from the loopback address src
// (127.0.0.0/8 is all loopback on Linux: one "host" per address).
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// closedWithin reports whether the server closes c within d (a read ends with
// EOF or a reset rather than the deadline).
func closedWithin(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// deviceFrom connects pipe-0001 from src and publishes one QoS 1 message.
func deviceFrom(src, addr string) error {
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("pipe-0001").
		SetUsername("pipe-0001").SetPassword("secret-pipe-0001").SetAutoReconnect(false).SetProtocolVersion(4).
		SetConnectTimeout(5 * time.Second).SetDialer(&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second})
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return errors.New("connect timed out")
	}
	if tok.Error() != nil {
		return tok.Error()
	}
	defer c.Disconnect(50)
	tok = c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":300}]`))
	if !tok.WaitTimeout(10 * time.Second) {
		return errors.New("no PUBACK")
	}
	return tok.Error()
}

func startGatedBroker(t *testing.T, rec *recorder, cfg MQTTConfig) *Broker {
	t.Helper()
	cfg.Enabled = true
	b, err := NewBroker(cfg, testRegistry(t), NewHandler(rec, HandlerOptions{}), nil, nil)
	require.NoError(t, err)
	runGateway(t, b)
	return b
}

// A connection must send CONNECT within ingest.mqtt.connect_timeout (on the
// TLS port: finish the handshake and send CONNECT), or it is closed: idle,
// trickling a partial CONNECT, or stuck before or after the TLS handshake.
func TestBrokerClosesConnectionsThatNeverConnect(t *testing.T) {
	cert, key, _ := selfSigned(t)
	b := startGatedBroker(t, &recorder{}, MQTTConfig{Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", CertFile: cert, KeyFile: key,
		ConnectTimeout: 300 * time.Millisecond, MaxPendingConnections: 100, MaxPendingPerAddress: 100})
	for _, tc := range []struct {
		name string
		open func(t *testing.T) net.Conn
	}{
		{"idle", func(t *testing.T) net.Conn { return dialFrom(t, "127.0.0.1", b.Addr().String()) }},
		{"partial CONNECT", func(t *testing.T) net.Conn {
			c := dialFrom(t, "127.0.0.1", b.Addr().String())
			_, err := c.Write([]byte{0x10, 0x20, 0x00}) // CONNECT, 32 bytes to come, then nothing
			require.NoError(t, err)
			return c
		}},
		{"TLS port, no handshake", func(t *testing.T) net.Conn { return dialFrom(t, "127.0.0.1", b.TLSAddr().String()) }},
		{"TLS port, handshake but no CONNECT", func(t *testing.T) net.Conn {
			c := tls.Client(dialFrom(t, "127.0.0.1", b.TLSAddr().String()), &tls.Config{InsecureSkipVerify: true})
			require.NoError(t, c.Handshake())
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.open(t)
			require.True(t, closedWithin(c, 10*time.Second), "closed after the connect timeout")
		})
	}
	require.Eventually(t, func() bool { return b.gate.pending() == 0 }, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, 4.0, testutil.ToFloat64(b.gate.closed.WithLabelValues(preAuthTimeout)))
	require.NoError(t, deviceFrom("127.0.0.1", b.Addr().String()), "a device that sends CONNECT in time is served")
}

// Connections that have not authenticated are limited per source address and
// in total; a new connection past a limit closes the oldest pending one under
// that limit, so idle sockets cannot lock devices out; a slot is freed when
// its connection closes or authenticates.
func TestBrokerBoundsPendingConnections(t *testing.T) {
	b := startGatedBroker(t, &recorder{}, MQTTConfig{Addr: "127.0.0.1:0",
		ConnectTimeout: time.Minute, MaxPendingConnections: 6, MaxPendingPerAddress: 3})
	addr := b.Addr().String()
	evictions := func() float64 {
		return testutil.ToFloat64(b.gate.closed.WithLabelValues(preAuthAddressLimit)) +
			testutil.ToFloat64(b.gate.closed.WithLabelValues(preAuthTotalLimit))
	}
	// idle opens a connection from src per count, waiting each time until the
	// gate holds that many and has admitted it (so "oldest" is well defined)
	idle := func(src string, counts ...int) []net.Conn {
		var cs []net.Conn
		for _, want := range counts {
			n, ev := b.gate.pending(), evictions()
			cs = append(cs, dialFrom(t, src, addr))
			require.Eventually(t, func() bool {
				return b.gate.pending() == want && (want > n || evictions() > ev)
			}, 5*time.Second, time.Millisecond)
		}
		return cs
	}
	kept := func(cs ...net.Conn) {
		t.Helper()
		for _, c := range cs {
			require.False(t, closedWithin(c, 50*time.Millisecond), "kept")
		}
	}
	first := idle("127.0.0.1", 1, 2, 3)
	kept(first...)
	fourth := idle("127.0.0.1", 3)
	require.True(t, closedWithin(first[0], 5*time.Second), "a 4th from the same address closes the oldest of them")
	kept(first[1], first[2], fourth[0])
	require.NoError(t, deviceFrom("127.0.0.2", addr), "a device from another address connects and publishes")
	require.Equal(t, 3, b.gate.pending(), "an authenticated connection holds no slot")

	other := idle("127.0.0.3", 4, 5, 6)
	kept(other...)
	last := idle("127.0.0.4", 6)
	require.True(t, closedWithin(first[1], 5*time.Second), "past the total limit the oldest of all is closed")
	kept(first[2], fourth[0], last[0])
	require.NoError(t, deviceFrom("127.0.0.5", addr), "a device gets in even with every slot taken")
	require.True(t, closedWithin(first[2], 5*time.Second))
	for _, c := range other {
		c.Close()
	}
	require.Eventually(t, func() bool { return b.gate.pending() == 2 }, 5*time.Second, 10*time.Millisecond,
		"slots are freed when connections close")

	require.Equal(t, 1.0, testutil.ToFloat64(b.gate.closed.WithLabelValues(preAuthAddressLimit)))
	require.Equal(t, 2.0, testutil.ToFloat64(b.gate.closed.WithLabelValues(preAuthTotalLimit)))
}

func TestAddrKey(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"127.0.0.1:1883", "127.0.0.1"},
		{"[::ffff:10.1.2.3]:1883", "10.1.2.3"},
		{"[2001:db8:1:2:3:4:5:6]:1883", "2001:db8:1:2::"}, // one /64
		{"[2001:db8:1:2:ffff::1]:9", "2001:db8:1:2::"},
	} {
		ap := netip.MustParseAddrPort(tc.in)
		require.Equal(t, tc.want, addrKey(net.TCPAddrFromAddrPort(ap)).String(), tc.in)
	}
	require.Equal(t, netip.Addr{}, addrKey(&net.UnixAddr{Name: "/x", Net: "unix"}))
}

// The budget: clients and pending connections together stay within what the
// open-files limit leaves; pending take at most a quarter.
func TestConnectionBudget(t *testing.T) {
	for _, tc := range []struct {
		cfg                 MQTTConfig
		allowed             int64
		clients             int64
		pending, perAddress int
	}{
		{MQTTConfig{MaxConnections: 100000, MaxPendingConnections: 1024, MaxPendingPerAddress: 64}, 943718, 100000, 1024, 64},
		{MQTTConfig{MaxConnections: 100000, MaxPendingConnections: 1024, MaxPendingPerAddress: 64}, 17744, 16720, 1024, 64},
		{MQTTConfig{MaxConnections: 100000, MaxPendingConnections: 1024, MaxPendingPerAddress: 64}, 744, 558, 186, 64},
		{MQTTConfig{MaxConnections: 100000, MaxPendingConnections: 1024, MaxPendingPerAddress: 500}, 744, 558, 186, 186},
		{MQTTConfig{}, 5000, 3976, 1024, 64}, // zero values: the defaults
	} {
		t.Run(fmt.Sprint(tc.allowed, "/", tc.cfg.MaxConnections), func(t *testing.T) {
			clients, pending, perAddr := connectionBudget(tc.cfg, tc.allowed)
			require.Equal(t, tc.clients, clients)
			require.Equal(t, tc.pending, pending)
			require.Equal(t, tc.perAddress, perAddr)
			require.LessOrEqual(t, clients+int64(pending), tc.allowed)
		})
	}
}

func TestPendingConnectionKeysAreValidated(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*MQTTConfig)
		want string
	}{
		{"defaults", func(*MQTTConfig) {}, ""},
		{"no connect timeout", func(c *MQTTConfig) { c.ConnectTimeout = 0 }, "ingest.mqtt.connect_timeout"},
		{"an hour to connect", func(c *MQTTConfig) { c.ConnectTimeout = time.Hour }, "ingest.mqtt.connect_timeout"},
		{"no pending connections", func(c *MQTTConfig) { c.MaxPendingConnections = 0 }, "ingest.mqtt.max_pending_connections"},
		{"per address above the total", func(c *MQTTConfig) { c.MaxPendingPerAddress = 2000 }, "ingest.mqtt.max_pending_per_address"},
		{"none per address", func(c *MQTTConfig) { c.MaxPendingPerAddress = 0 }, "ingest.mqtt.max_pending_per_address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Default()
			tc.edit(&cfg.MQTT)
			err := cfg.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"
)

// openFDs counts a process's open descriptors.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	require.NoError(t, err)
	return len(es)
}

// A host that opens sockets to the MQTT port and never sends CONNECT cannot
// exhaust the server's descriptors: past ingest.mqtt.max_pending_per_address
// its connections are closed at once, the rest after
// ingest.mqtt.connect_timeout. Meanwhile a device from another address
// connects and publishes QoS 1 and /readyz answers. Quick form 2,000 sockets;
// make test-long sets CITYPULSE_TEST_IDLE_SOCKETS=20000 (bounded by this
// process's open-files limit, since it holds every socket too).
func TestIdleSocketFlood(t *testing.T) {
	skipShort(t)
	n := 2000
	if v := os.Getenv("CITYPULSE_TEST_IDLE_SOCKETS"); v != "" {
		var err error
		n, err = strconv.Atoi(v)
		require.NoError(t, err)
	}
	var fds syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &fds))
	if int(fds.Cur)-300 < n {
		n = int(fds.Cur) - 300
		t.Logf("open-files limit %d: flooding with %d sockets", fds.Cur, n)
	}
	const timeout = 8 * time.Second
	s := newProc(t, fmt.Sprintf("ingest:\n  mqtt:\n    connect_timeout: %v\n", timeout))
	s.start()
	defer s.stop()
	pid := s.Pid()
	time.Sleep(time.Second) // let start-up settle
	fdBefore, rssBefore := openFDs(t, pid), rssKiB(t, pid)

	// the flood: one host (127.0.0.1), n sockets that never send a byte
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, Timeout: 5 * time.Second}
	t0, dialErrs := time.Now(), 0
	for range n {
		c, err := d.Dial("tcp", s.mqtt)
		if err != nil {
			// a reset that ends the dial is the server refusing; anything else is not
			require.True(t, errors.Is(err, syscall.ECONNRESET), "%v", err)
			dialErrs++
			continue
		}
		conns = append(conns, c)
	}
	opened := time.Since(t0)
	fdDuring, rssDuring := openFDs(t, pid), rssKiB(t, pid)

	// a real device from another address, and the HTTP API, during the flood
	o := mqtt.NewClientOptions().AddBroker("tcp://" + s.mqtt).SetClientID("pipe-0001").SetUsername("pipe-0001").
		SetPassword("secret-pipe-0001").SetAutoReconnect(false).SetProtocolVersion(4).SetConnectTimeout(5 * time.Second).
		SetDialer(&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second})
	c := mqtt.NewClient(o)
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(10*time.Second), "the device's CONNACK during the flood")
	require.NoError(t, tok.Error(), "the device connects during the flood")
	publish(t, c, "devices/pipe-0001/readings", 1, []byte(`[{"n":"pressure","v":300}]`))
	c.Disconnect(50)
	require.Contains(t, get(t, "http://"+s.http+"/readyz"), "ready", "/readyz during the flood")
	t.Logf("%d idle sockets from one host (opened in %v, %d refused during the dial): server descriptors %d before, %d during; RSS %d MiB before, %d MiB during; the device published QoS 1 and /readyz answered during the flood",
		n, opened.Round(time.Millisecond), dialErrs, fdBefore, fdDuring, rssBefore/1024, rssDuring/1024)

	// the sockets admitted are closed after the connect timeout
	var fdAfter int
	eventually(t, timeout+20*time.Second, func() error {
		if fdAfter = openFDs(t, pid); fdAfter > fdBefore+20 {
			return fmt.Errorf("server holds %d descriptors, %d before the flood", fdAfter, fdBefore)
		}
		return nil
	})
	stillOpen := 0
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		var ne net.Error
		if _, err := c.Read(make([]byte, 1)); errors.As(err, &ne) && ne.Timeout() {
			stillOpen++
		}
	}
	t.Logf("server descriptors %d after the connect timeout (%v)", fdAfter, timeout)
	require.Zero(t, stillOpen, "every flood socket is closed by the server")
	require.Less(t, fdDuring, fdBefore+64+50, "at most max_pending_per_address (64) flood sockets held at once")
}

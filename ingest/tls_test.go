package ingest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"
)

// selfSigned writes a certificate for 127.0.0.1 and its key; it returns their
// paths and a pool that trusts the certificate.
func selfSigned(t *testing.T) (string, string, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "citypulse-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	dir := t.TempDir()
	cert, keyf := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	require.NoError(t, os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyf, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600))
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return cert, keyf, pool
}

func TestBrokerOverTLS(t *testing.T) {
	cert, key, pool := selfSigned(t)
	rec := &recorder{}
	h := NewHandler(rec, HandlerOptions{})
	b, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", CertFile: cert, KeyFile: key},
		testRegistry(t), h, nil, nil)
	require.NoError(t, err)
	runGateway(t, b)
	addr := b.TLSAddr().String()

	dial := func(scheme, id, secret string, tc *tls.Config) (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker(scheme + "://" + addr).SetClientID(id).SetUsername(id).SetPassword(secret).
			SetAutoReconnect(false).SetConnectTimeout(3 * time.Second).SetTLSConfig(tc)
		c := paho.NewClient(o)
		tok := c.Connect()
		tok.WaitTimeout(5 * time.Second)
		if tok.Error() == nil {
			t.Cleanup(func() { c.Disconnect(50) })
		}
		return c, tok.Error()
	}
	t.Run("a device publishes over TLS", func(t *testing.T) {
		c, err := dial("ssl", "pipe-0001", "secret-pipe-0001", &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
		require.NoError(t, err)
		tok := c.Publish("devices/pipe-0001/readings", 1, false, []byte(`[{"n":"pressure","v":300}]`))
		require.True(t, tok.WaitTimeout(5*time.Second))
		require.NoError(t, tok.Error())
		require.Len(t, rec.readings(), 1)
	})
	t.Run("a wrong password is refused over TLS too", func(t *testing.T) {
		_, err := dial("ssl", "pipe-0001", "wrong", &tls.Config{RootCAs: pool})
		require.Error(t, err)
	})
	t.Run("an untrusted certificate is refused by the client", func(t *testing.T) {
		_, err := dial("ssl", "pipe-0001", "secret-pipe-0001", &tls.Config{})
		require.ErrorContains(t, err, "certificate")
	})
	t.Run("plain MQTT on the TLS port gets nowhere", func(t *testing.T) {
		_, err := dial("tcp", "pipe-0001", "secret-pipe-0001", nil)
		require.Error(t, err)
	})
	t.Run("TLS 1.1 is refused", func(t *testing.T) {
		_, err := dial("ssl", "pipe-0001", "secret-pipe-0001", &tls.Config{RootCAs: pool, MaxVersion: tls.VersionTLS11})
		require.Error(t, err)
	})
}

// With addr empty the broker speaks MQTT over TLS only.
func TestBrokerTLSOnly(t *testing.T) {
	cert, key, pool := selfSigned(t)
	rec := &recorder{}
	b, err := NewBroker(MQTTConfig{Enabled: true, TLSAddr: "127.0.0.1:0", CertFile: cert, KeyFile: key},
		testRegistry(t), NewHandler(rec, HandlerOptions{}), nil, nil)
	require.NoError(t, err)
	runGateway(t, b)
	require.Nil(t, b.Addr(), "no plain listener")
	o := paho.NewClientOptions().AddBroker("ssl://" + b.TLSAddr().String()).SetClientID("pipe-0001").
		SetUsername("pipe-0001").SetPassword("secret-pipe-0001").SetAutoReconnect(false).
		SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	c := paho.NewClient(o)
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(5*time.Second))
	require.NoError(t, tok.Error())
	defer c.Disconnect(50)
	cfg := Default()
	cfg.MQTT.Addr, cfg.MQTT.TLSAddr, cfg.MQTT.CertFile, cfg.MQTT.KeyFile = "", ":8883", cert, key
	require.NoError(t, cfg.Validate(), "TLS only is a valid config")
	cfg.MQTT.TLSAddr = ""
	require.ErrorContains(t, cfg.Validate(), "ingest.mqtt.addr", "but not neither")
}

func TestBrokerTLSNeedsAUsableCertificate(t *testing.T) {
	_, err := NewBroker(MQTTConfig{Enabled: true, Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", CertFile: "/nonexistent", KeyFile: "/nonexistent"},
		testRegistry(t), NewHandler(&recorder{}, HandlerOptions{}), nil, nil)
	require.ErrorContains(t, err, "ingest.mqtt.cert_file")
	c := Default()
	c.MQTT.TLSAddr = ":8883"
	require.ErrorContains(t, c.Validate(), "needs ingest.mqtt.cert_file")
}

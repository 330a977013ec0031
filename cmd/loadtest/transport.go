package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/options"
)

// conn is one connection of the simulated fleet: an MQTT client or a CoAP
// client. send returns once the message is handed over (blocking while the
// in-flight window is full) and then calls done exactly once with the outcome
// (when it returns an error, the message was not sent and done is not called);
// acked is false where the protocol has no acknowledgement (QoS 0, CoAP NON
// without a response).
type conn interface {
	send(ctx context.Context, dev *simDevice, body []byte, done func(acked bool, err error)) error
	// reconnect drops the connection and opens a new one.
	reconnect(ctx context.Context) error
	close()
}

// acquire takes a slot of an in-flight window, or gives up when ctx ends.
func acquire(ctx context.Context, window chan struct{}) error {
	select {
	case window <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// dialer opens the connections of a scenario.
type dialer func(ctx context.Context, sc Scenario, devs []*simDevice, n int) (conn, error)

func dialerFor(sc Scenario) dialer {
	switch {
	case sc.Transport.Protocol == "coap" && sc.Transport.DTLS:
		return dialCoAP
	case sc.Transport.Protocol == "coap":
		return dialRawCoAP
	}
	return dialMQTT
}

// ---- MQTT (paho, v3.1.1) ----

type mqttConn struct {
	sc     Scenario
	user   *simDevice // credentials of the connection
	id     string
	mu     sync.Mutex
	client mqtt.Client
	window chan struct{}
	wg     sync.WaitGroup
	// lastDial paces reconnects after the server went away: one try per
	// redialEvery, the messages in between fail as "not connected".
	lastDial time.Time
}

const redialEvery = 500 * time.Millisecond

func dialMQTT(ctx context.Context, sc Scenario, devs []*simDevice, n int) (conn, error) {
	c := &mqttConn{sc: sc, user: devs[0], id: fmt.Sprintf("%s-conn-%d", sc.Fleet.Prefix, n),
		window: make(chan struct{}, sc.Transport.InFlight)}
	if sc.Transport.Connections == 0 {
		c.id = devs[0].ID
	}
	return c, c.connect(ctx)
}

func (c *mqttConn) connect(ctx context.Context) error {
	o := mqtt.NewClientOptions().AddBroker("tcp://" + c.sc.Target.MQTT).
		SetClientID(c.id + "-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)).
		SetUsername(c.user.ID).SetPassword(c.user.Secret).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).SetWriteTimeout(10 * time.Second).
		SetMaxResumePubInFlight(c.sc.Transport.InFlight).SetOrderMatters(false)
	cl := mqtt.NewClient(o)
	tok := cl.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("mqtt connect %s as %s: %w", c.sc.Target.MQTT, c.user.ID, err)
	}
	c.mu.Lock()
	c.client = cl
	c.mu.Unlock()
	return nil
}

func (c *mqttConn) send(ctx context.Context, dev *simDevice, body []byte, done func(bool, error)) error {
	if err := acquire(ctx, c.window); err != nil {
		return err
	}
	c.mu.Lock()
	cl := c.client
	c.mu.Unlock()
	if (cl == nil || !cl.IsConnectionOpen()) && time.Since(c.lastDial) > redialEvery {
		c.lastDial = time.Now()
		if err := c.reconnect(ctx); err == nil {
			c.mu.Lock()
			cl = c.client
			c.mu.Unlock()
		}
	}
	if cl == nil || !cl.IsConnectionOpen() {
		<-c.window
		return errors.New("mqtt: not connected") // not sent: done is not called
	}
	tok := cl.Publish("devices/"+dev.ID+"/readings", c.sc.Transport.QoS, false, body)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { <-c.window }()
		t := time.NewTimer(30 * time.Second)
		defer t.Stop()
		select {
		case <-tok.Done():
			done(c.sc.Transport.QoS > 0 && tok.Error() == nil, tok.Error())
		case <-t.C:
			done(false, errors.New("mqtt: no PUBACK within 30s"))
		}
	}()
	return nil
}

func (c *mqttConn) reconnect(ctx context.Context) error {
	c.mu.Lock()
	cl := c.client
	c.client = nil
	c.mu.Unlock()
	if cl != nil {
		cl.Disconnect(0)
	}
	return c.connect(ctx)
}

func (c *mqttConn) close() {
	c.mu.Lock()
	cl := c.client
	c.mu.Unlock()
	c.wg.Wait() // every outstanding publish has its outcome
	if cl != nil {
		cl.Disconnect(250)
	}
}

// ---- CoAP over DTLS-PSK (go-coap; plain UDP is rawCoAPConn) ----

type coapConn struct {
	sc     Scenario
	user   *simDevice
	mu     sync.Mutex
	do     func(ctx context.Context, dev *simDevice, body []byte) (codes.Code, error)
	closer func()
	window chan struct{}
	wg     sync.WaitGroup
}

func dialCoAP(ctx context.Context, sc Scenario, devs []*simDevice, _ int) (conn, error) {
	c := &coapConn{sc: sc, user: devs[0], window: make(chan struct{}, sc.Transport.InFlight)}
	return c, c.connect(ctx)
}

func (c *coapConn) connect(ctx context.Context) error {
	cf := message.AppSenmlJSON
	switch c.sc.Format {
	case "senml-cbor":
		cf = message.AppSenmlCbor
	case "json":
		cf = message.AppJSON
	}
	typ := message.NonConfirmable
	if c.sc.Transport.Confirmable {
		typ = message.Confirmable
	}
	// go-coap clients send one request at a time unless told otherwise
	n := int64(c.sc.Transport.InFlight)
	par, parEP := options.WithLimitClientParallelRequest(n), options.WithLimitClientEndpointParallelRequest(n)
	key := c.user.Secret
	co, err := dtls.Dial(c.sc.Target.CoAP, dtls.NewDTLSClientOptions(
		piondtls.WithPSK(func([]byte) ([]byte, error) { return []byte(key), nil }),
		piondtls.WithPSKIdentityHint([]byte(c.user.ID)),
		piondtls.WithCipherSuites(piondtls.TLS_PSK_WITH_AES_128_CCM_8)), par, parEP)
	if err != nil {
		return fmt.Errorf("coap dial %s as %s (dtls): %w", c.sc.Target.CoAP, c.user.ID, err)
	}
	c.set(func(ctx context.Context, dev *simDevice, body []byte) (codes.Code, error) {
		req, err := co.NewPostRequest(ctx, "/devices/"+dev.ID+"/readings", cf, bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		req.SetType(typ)
		resp, err := co.Do(req)
		if err != nil {
			return 0, err
		}
		return resp.Code(), nil
	}, func() { _ = co.Close() })
	return nil
}

func (c *coapConn) set(do func(context.Context, *simDevice, []byte) (codes.Code, error), closer func()) {
	c.mu.Lock()
	c.do, c.closer = do, closer
	c.mu.Unlock()
}

// coapError is a response other than 2.04 Changed.
type coapError struct{ code codes.Code }

func (e coapError) Error() string { return "coap: " + e.code.String() }

func (c *coapConn) send(ctx context.Context, dev *simDevice, body []byte, done func(bool, error)) error {
	if err := acquire(ctx, c.window); err != nil {
		return err
	}
	c.mu.Lock()
	do := c.do
	c.mu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { <-c.window }()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		code, err := do(rctx, dev, body)
		switch {
		case err != nil:
			done(false, err)
		case code != codes.Changed:
			done(false, coapError{code})
		default:
			done(true, nil)
		}
	}()
	return nil
}

func (c *coapConn) reconnect(ctx context.Context) error {
	c.wg.Wait()
	c.mu.Lock()
	cl := c.closer
	c.mu.Unlock()
	if cl != nil {
		cl()
	}
	return c.connect(ctx)
}

func (c *coapConn) close() {
	c.wg.Wait()
	c.mu.Lock()
	cl := c.closer
	c.mu.Unlock()
	if cl != nil {
		cl()
	}
}

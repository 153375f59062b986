// Go client for tests/integration/test_probe_inject.py: waits for a line on stdin (the test's
// go-ahead, once the agent knows this process is Go), then GETs the URL in os.Args[1] and
// prints the answer's body.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	resp, err := http.Get(os.Args[1])
	if err != nil {
		panic(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(string(body))
}

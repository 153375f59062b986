// Echo server for tests/integration/test_probe_inject.py: answers with the traceparent values
// the request carried, as JSON {"tp": [...]}.
package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, _ := json.Marshal(map[string][]string{"tp": r.Header.Values("Traceparent")})
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Write(body)
	})
	fmt.Println("ready")
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		panic(err)
	}
}
